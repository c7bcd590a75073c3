"""cache/storage.py: locations, atomic writes, listings and Zarr stores, local and on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore, LocalStore

from revq_pipe.cache import storage
from revq_pipe.cache.storage import StorageError


# ---- locations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["s3://bucket/c.zarr", "gs://bucket/prefix/", "file:///tmp/x", "S3://Bucket/k",
                                  "az://container/blob", "simplecache::s3://bucket/k"])
def test_urls(text):
    assert storage.is_url(text)


@pytest.mark.parametrize("text", ["C:\\data\\c.zarr", "C:/data/c.zarr", "c:relative", "\\\\server\\share\\x",
                                  "relative/c.zarr", "/abs/c.zarr", "./s3:/bucket", "s3:/bucket/c.zarr", "s3:", "",
                                  Path("s3://bucket/c.zarr")])
def test_not_urls(text):
    assert not storage.is_url(text)


@pytest.mark.parametrize("text", ["s3:/bucket/c.zarr", "gs:/bucket", "s3:", Path("s3://bucket/c.zarr")])
def test_url_mangled_into_a_path_is_refused(text):
    # pathlib folds "s3://b/k" into "s3:/b/k"; writing a local folder of that name is the bug of issue 12
    with pytest.raises(StorageError, match=r"s3://|gs://"):
        storage.filesystem(text)
    with pytest.raises(StorageError):
        storage.local_path(text)


def test_local_paths_and_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.local_path("rel/c.zarr") == tmp_path / "rel" / "c.zarr"
    assert storage.local_path("./s3:/bucket") == tmp_path / "s3:" / "bucket"  # spelled as a local folder
    assert storage.local_path(f"file://{tmp_path}/c.zarr") == tmp_path / "c.zarr"
    assert storage.local_path("s3://bucket/c.zarr") is None
    assert storage.join("s3://bucket/c.zarr/", "_staging", "unit_000001.npz") == "s3://bucket/c.zarr/_staging/unit_000001.npz"
    assert storage.join(tmp_path, "_staging") == tmp_path / "_staging"
    assert isinstance(storage.zarr_store(tmp_path / "c.zarr", mode="w"), LocalStore)


def test_options_and_unknown_schemes():
    assert storage.storage_options() == {}
    assert storage.storage_options("http://127.0.0.1:9000") == {"endpoint_url": "http://127.0.0.1:9000"}
    with pytest.raises(StorageError, match="storage.endpoint_url"):
        storage.storage_options("127.0.0.1:9000")
    with pytest.raises(StorageError, match="nosuchscheme"):
        storage.filesystem("nosuchscheme://bucket/x")
    with pytest.raises(ValueError, match="mode"):
        storage.zarr_store("s3://bucket/c.zarr", mode="x")


# ---- files and objects, the same test on local disk and on S3 ------------------------------------

@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder or bucket prefix to work in."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"


def test_write_read_list_remove(root):
    staging = storage.join(root, "_staging")
    assert not storage.exists(root)
    assert storage.list_prefix(root) == []
    for u in (2, 0, 1):
        storage.write_bytes_atomic(storage.join(staging, f"unit_{u:06d}.npz"), f"unit {u}".encode())
    storage.write_bytes_atomic(storage.join(root, "_staging_not_this", "x"), b"sibling")  # shares the name prefix
    storage.write_bytes_atomic(storage.join(staging, "unit_000001.npz"), b"rewritten")

    assert storage.exists(root) and storage.exists(storage.join(staging, "unit_000002.npz"))
    assert storage.read_bytes(storage.join(staging, "unit_000001.npz")) == b"rewritten"
    assert storage.list_prefix(staging) == ["unit_000000.npz", "unit_000001.npz", "unit_000002.npz"]  # no temp files
    assert storage.list_prefix(root) == ["_staging/unit_000000.npz", "_staging/unit_000001.npz",
                                         "_staging/unit_000002.npz", "_staging_not_this/x"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(staging, "unit_000009.npz"))

    storage.remove_tree(staging)
    storage.remove_tree(staging)  # absent: nothing to do
    assert not storage.exists(staging)
    assert storage.list_prefix(root) == ["_staging_not_this/x"]


def test_upload_dir_round_trip(root, tmp_path, monkeypatch):
    source = tmp_path / "tokenizer"
    (source / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 64, "sub/stats.npy": b"\x93NUMPY"}
    for name, data in files.items():
        (source / name).write_bytes(data)

    fs, _ = storage.filesystem(root)  # fsspec caches instances: upload_dir gets this same one
    batches, put = [], fs.put
    monkeypatch.setattr(fs, "put", lambda lpaths, rpaths, **kw: (batches.append(rpaths), put(lpaths, rpaths, **kw)))
    target = storage.join(root, "tokenizer")
    assert storage.upload_dir(source, target, last=("config.json",)) == sorted(files)

    assert storage.list_prefix(target) == sorted(files)
    for name, data in files.items():
        assert storage.read_bytes(storage.join(target, name)) == data
    if storage.is_url(root):  # object store: everything else first, config.json in a later batch
        assert [[Path(p).name for p in b] for b in batches] == [["model.safetensors", "stats.npy"], ["config.json"]]
    with pytest.raises(StorageError, match="missing.json"):
        storage.upload_dir(source, target, last=("missing.json",))


# ---- S3 specifics ---------------------------------------------------------------------------------

def test_refuses_to_remove_a_whole_bucket(s3_bucket):
    storage.write_bytes_atomic(s3_bucket + "/keep", b"x")
    with pytest.raises(StorageError, match="whole bucket"):
        storage.remove_tree(s3_bucket)
    assert storage.read_bytes(s3_bucket + "/keep") == b"x"


def test_endpoint_from_the_setting(s3_bucket, s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = storage.storage_options(s3_server.endpoint_url)
    storage.write_bytes_atomic(s3_bucket + "/x", b"via the setting", options)
    assert storage.read_bytes(s3_bucket + "/x", options) == b"via the setting"
    group = zarr.open_group(storage.zarr_store(s3_bucket + "/c.zarr", "w", options), mode="w")
    group.attrs["complete"] = False
    assert zarr.open_group(storage.zarr_store(s3_bucket + "/c.zarr", "r", options), mode="r").attrs["complete"] is False


def test_endpoint_from_the_s3_variable(s3_bucket, s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    options = {"skip_instance_cache": True}  # a new client that reads the environment as it is now
    storage.write_bytes_atomic(s3_bucket + "/x", b"via AWS_ENDPOINT_URL_S3", options)
    assert storage.read_bytes(s3_bucket + "/x", options) == b"via AWS_ENDPOINT_URL_S3"


def test_zarr_group_and_array_on_s3(s3_bucket):
    url = s3_bucket + "/train.zarr"
    latents = np.random.default_rng(0).standard_normal((10, 4, 8, 8)).astype(np.float16)
    store = storage.zarr_store(url, mode="w")
    assert isinstance(store, FsspecStore)
    group = zarr.open_group(store, mode="w")
    group.attrs.update({"format": "revq-latent-cache", "complete": False})
    group.create_array("latents", shape=latents.shape, chunks=(4, 4, 8, 8), dtype="float16")[...] = latents
    group.create_array("keys", shape=(10,), dtype=str)[...] = np.array([f"k{i}" for i in range(10)])
    group.attrs["complete"] = True  # the marker: its own PUT of zarr.json, after the arrays

    # one object per chunk, metadata beside them, nothing local
    assert {"zarr.json", "latents/zarr.json", "latents/c/0/0/0/0", "latents/c/2/0/0/0"} <= set(storage.list_prefix(url))
    read = zarr.open_group(storage.zarr_store(url, mode="r"), mode="r")
    assert dict(read.attrs) == {"format": "revq-latent-cache", "complete": True}
    np.testing.assert_array_equal(read["latents"][...], latents)
    assert read["latents"].dtype == np.float16 and read["keys"][3] == "k3"
    with pytest.raises(Exception, match="read.only|read_only"):
        read["latents"][0] = 0


def test_access_denied_is_named_with_the_url_and_the_fix():
    """What s3fs raises for a 403 (its own translation of botocore's error) becomes one line; others stay as they are."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    denied = translate_boto_error(ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                                              "PutObject"))
    assert isinstance(denied, PermissionError)
    message = storage.describe_failure(denied, "s3://bucket/val.zarr")
    assert message.startswith("cannot use s3://bucket/val.zarr: access was denied; use credentials that may")
    assert storage.describe_failure(FileNotFoundError("bucket/val.zarr/zarr.json"), "s3://bucket/val.zarr") is None
    assert storage.describe_failure(PermissionError("local file"), "/tmp/x") is None  # not an object store
    assert storage.describe_failure(ValueError("unrelated")) is None
