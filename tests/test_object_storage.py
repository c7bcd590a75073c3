"""Stage one and two against object storage: a real S3-compatible HTTP server (moto) on 127.0.0.1.

Each test gets a fresh bucket (the `s3_bucket` fixture, tests/conftest.py) with AWS_* pointed at the
server, also for subprocesses (a killed encode, two ranks).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from revq_pipe.cache import storage
from revq_pipe.cache.reader import LatentCache, cache_info
from revq_pipe.cache.schema import CacheError
from revq_pipe.cache.staging import staged_unit_ids
from revq_pipe.stages.config import load_config
from revq_pipe.stages.encode import run_encode
from revq_pipe.stages.train import run_train
from tests.helpers_cache import store_files
from tests.helpers_encode import config, driver, encode_in_process, env
from tests.helpers_processes import one_thread, run_ranks
from tests.helpers_train import TINY, make_cache, structured_latents


def object_files(url: str) -> dict[str, bytes]:
    """Every object below url, by relative name, like store_files for a local folder."""
    return {name: storage.read_bytes(f"{url}/{name}") for name in storage.list_prefix(url)}


def test_encode_to_s3_equals_local_and_reads_back(encode_data, encode_reference, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"{s3_bucket}/caches/train.zarr"
    manifest = encode_in_process(encode_data, url)
    assert manifest.complete and manifest.num_samples == 40
    assert not (tmp_path / "s3:").exists()
    # the very same objects as the local store's files, and no staging left behind
    assert object_files(url) == store_files(encode_reference)
    # the resolved config is an object beside the store
    cfg = yaml.safe_load(storage.read_bytes(f"{s3_bucket}/caches/train.config.yaml"))
    assert cfg["encode"]["chunk_size"] == 8

    remote, local = LatentCache.open(url), LatentCache.open(encode_reference)
    assert remote.path == url and remote.is_remote
    assert torch.equal(remote.load_latents(), local.load_latents())
    seen = []
    assert torch.equal(remote.load_latents(progress=seen.append, threads=3), local.load_latents())
    assert sum(seen) == remote.nbytes
    assert torch.equal(remote.read(3, 17), local.read(3, 17))
    assert remote.keys() == local.keys() and np.array_equal(remote.labels(), local.labels())
    rows = np.array([31, 2, 17, 39, 8])
    assert np.array_equal(remote.read_rows(rows), local.read_rows(rows))
    info = cache_info(url)
    assert info["complete"] and info["path"] == url and info["bytes_on_disk"] > 0
    assert info["storage"]["num_chunks"] == 5

    # rerunning is a no-op; a finished store is refused without --overwrite, replaced with it
    assert encode_in_process(encode_data, url).num_samples == 40
    with pytest.raises(CacheError, match="no latent cache at s3://"):
        LatentCache.open(f"{s3_bucket}/caches/missing.zarr")
    assert not (tmp_path / "s3:").exists()


def test_encode_cli_to_s3_never_writes_a_local_s3_folder(encode_data, s3_bucket, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from revq_pipe.stages.cli import app

    monkeypatch.chdir(tmp_path)
    url = f"{s3_bucket}/c.zarr"
    with one_thread():
        result = CliRunner().invoke(app, [
            "encode", "--images", str(encode_data["images"]), "--out", url, "--split", "train",
            "--set", f"vae.source={encode_data['vae']}", "--set", "vae.device=cpu", "--set", "data.resolution=32",
            "--set", "encode.batch_size=4", "--set", "encode.chunk_size=8", "--set", "encode.num_workers=0"])
    assert result.exit_code == 0, result.output
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*")), sorted(tmp_path.rglob("*"))
    assert LatentCache.open(url).num_samples == 40
    with pytest.raises(storage.StorageError, match="collapsed"):
        LatentCache.open(url.replace("s3://", "s3:/"))  # what pathlib would have made of it


@pytest.mark.slow
def test_kill_and_resume_on_s3_matches_an_uninterrupted_run(encode_data, encode_reference, s3_bucket, capsys):
    url = f"{s3_bucket}/resumed.zarr"
    process = subprocess.Popen(driver(encode_data, url, "--unit-delay", "0.3"), env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(staged_unit_ids(url)) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    staged = len(staged_unit_ids(url))
    assert 2 <= staged < 6, staged  # killed mid-way: 6 units in all
    # one object per unit and nothing else below _staging (no torn or temporary objects)
    assert all(n.startswith("unit_") for n in storage.list_prefix(f"{url}/_staging"))
    with pytest.raises(CacheError, match="incomplete"):
        LatentCache.open(url)
    assert cache_info(url)["units_staged"] == staged

    encode_in_process(encode_data, url)
    assert f"resuming: {staged} of 6 units already encoded" in capsys.readouterr().err
    assert object_files(url) == store_files(encode_reference)


@pytest.mark.slow
def test_two_ranks_write_one_s3_store_like_one_rank(encode_data, encode_reference, s3_bucket):
    url = f"{s3_bucket}/two.zarr"
    result = run_ranks(driver(encode_data, url, "--workers", "1"), env(), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert object_files(url) == store_files(encode_reference)


def test_train_from_s3_caches(s3_bucket, tmp_path):
    folder = tmp_path / "caches"
    folder.mkdir()
    local = [make_cache(folder, split, structured_latents(n, seed)) for split, n, seed in
             (("train", 256, 0), ("val", 64, 1))]
    urls = []
    for path in local:
        url = f"{s3_bucket}/caches/{path.name}"
        storage.upload_dir(path, url, last=("zarr.json",))
        urls.append(url)
    overrides = [*TINY, "train.epochs=1", f"data.train_cache={urls[0]}", f"data.val_cache={urls[1]}",
                 f"train.push_to={s3_bucket}/tokenizers/a"]
    cfg = load_config(None, [*overrides, f"train.run={tmp_path / 'run'}"], {})
    assert cfg.data.train_cache == urls[0]  # a URL stays a URL in the config
    run = run_train(cfg)
    reference = run_train(load_config(None, [*TINY, "train.epochs=1", f"data.train_cache={local[0]}",
                                             f"data.val_cache={local[1]}", f"train.run={tmp_path / 'ref'}"], {}))
    assert (run / "tokenizer" / "model.safetensors").read_bytes() == \
        (reference / "tokenizer" / "model.safetensors").read_bytes()
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
    pushed = object_files(f"{s3_bucket}/tokenizers/a")  # the finished tokenizer, pushed; the run stays local
    assert pushed == {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}


def test_encode_from_webdataset_shards_in_the_bucket(encode_data, s3_bucket, tmp_path):
    """Images as .tar shards on object storage encode to the same latents as the same shards on disk."""
    import webdataset as wds

    from revq_pipe.stages.datasets import open_image_dataset

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(p for p in Path(encode_data["images"]).rglob("*.png"))
    for shard in range(2):
        with wds.TarWriter(str(shards / f"train-{shard:06d}.tar"), encoder=False, mtime=0) as sink:
            for i, path in enumerate(files[shard::2]):
                sink.write({"__key__": f"{shard}_{i:03d}", "png": path.read_bytes(), "cls": b"1"})
        storage.write_bytes_atomic(f"{s3_bucket}/shards/train-{shard:06d}.tar",
                                   (shards / f"train-{shard:06d}.tar").read_bytes())
    remote = open_image_dataset(f"{s3_bucket}/shards/train-{{000000..000001}}.tar")
    local = open_image_dataset(str(shards / "train-{000000..000001}.tar"))
    assert [remote.key(i) for i in range(len(remote))] == [local.key(i) for i in range(len(local))]
    assert remote.read_bytes(3) == local.read_bytes(3)
    with one_thread():
        run_encode(config(encode_data["vae"], num_workers=2), split="train", images=f"{s3_bucket}/shards/",
                   out=str(tmp_path / "r.zarr"),
                   overwrite=False)
        run_encode(config(encode_data["vae"]), split="train", images=str(shards), out=str(tmp_path / "l.zarr"),
                   overwrite=False)
    assert torch.equal(LatentCache.open(tmp_path / "r.zarr").load_latents(),
                       LatentCache.open(tmp_path / "l.zarr").load_latents())


def test_encode_from_an_image_folder_in_the_bucket(encode_data, encode_reference, s3_bucket, tmp_path):
    """An ImageFolder tree stored as objects reads and encodes like the same tree on disk: same keys, classes,
    labels, skipped (unreadable) images and latents; non-images counted, hidden objects passed over."""
    from revq_pipe.stages.datasets import open_image_dataset

    tree, url = Path(encode_data["images"]), f"{s3_bucket}/imagenet/train"
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        storage.write_bytes_atomic(f"{url}/{path.relative_to(tree).as_posix()}", path.read_bytes())
    storage.write_bytes_atomic(f"{url}/dog/notes.txt", b"not an image")
    storage.write_bytes_atomic(f"{url}/.cache/x.png", b"hidden")
    storage.write_bytes_atomic(f"{url}/cat/.DS_Store", b"hidden")
    remote, local = open_image_dataset(url), open_image_dataset(tree)
    assert [remote.key(i) for i in range(len(remote))] == [local.key(i) for i in range(len(local))]
    assert [remote.label(i) for i in range(len(remote))] == [local.label(i) for i in range(len(local))]
    assert remote.classes == local.classes == ["cat", "dog"] and remote.ignored == ["dog/notes.txt"]
    assert remote.read_bytes(5) == local.read_bytes(5)

    with one_thread():
        manifest = run_encode(config(encode_data["vae"], num_workers=2), split="train", images=f"{url}/",
                              out=str(tmp_path / "r.zarr"), overwrite=False)
    assert manifest.source == f"{url}/" and manifest.ignored == {"count": 1, "keys": ["dog/notes.txt"]}
    encoded, reference = LatentCache.open(tmp_path / "r.zarr"), LatentCache.open(encode_reference)
    assert encoded.keys() == reference.keys() and np.array_equal(encoded.labels(), reference.labels())
    assert encoded.manifest.skipped == reference.manifest.skipped
    assert torch.equal(encoded.load_latents(), reference.load_latents())
    with pytest.raises(FileNotFoundError, match="nothing is stored under"):
        open_image_dataset(f"{s3_bucket}/imagenet/val")


def test_storage_endpoint_setting_reaches_the_cache(encode_data, s3_bucket, s3_server, tmp_path, monkeypatch):
    """--set storage.endpoint_url works without AWS_ENDPOINT_URL in the environment."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    url = f"{s3_bucket}/ep.zarr"
    cfg = load_config(None, [f"storage.endpoint_url={s3_server.endpoint_url}"], {
        "vae.source": str(encode_data["vae"]), "vae.device": "cpu", "data.resolution": 32,
        "encode.batch_size": 4, "encode.chunk_size": 16, "encode.num_workers": 0})
    with one_thread():
        manifest = run_encode(cfg, split="train", images=str(encode_data["images"]), out=url, overwrite=False)
    options = storage.storage_options(s3_server.endpoint_url)
    assert LatentCache.open(url, options=options).num_samples == manifest.num_samples == 40


def test_token_store_on_s3_and_remote_refuse_or_overwrite(s3_bucket):
    from revq_pipe.cache.token_store import TokenStore, TokenWriter

    url = f"{s3_bucket}/tokens/train.zarr"
    spec = dict(num_inputs=5, split="train", num_tokens=3, codebook_size=16, layout={"t": 3},
                tokenizer={"dir": "x"}, vae={"source": "v"}, source={"kind": "test"},
                augment={"name": "none", "views": ["original"]}, chunk_size=2)
    ids = np.arange(15).reshape(5, 3) % 16
    writer = TokenWriter.open(url, **spec)
    assert writer.path == url and writer.pending_units() == [0, 1, 2]
    for u in writer.pending_units():
        lo, hi = writer.unit_range(u)
        writer.write_unit(u, ids[lo:hi, None], np.arange(lo, hi), [f"k{i}" for i in range(lo, hi)])  # (n, V=1, T)
    assert TokenWriter.open(url, create=False, **spec).pending_units() == []
    writer.finalize()
    assert not any(n.startswith("_staging") for n in storage.list_prefix(url))
    store = TokenStore.open(url)
    assert np.array_equal(store.ids(), ids) and store.keys() == [f"k{i}" for i in range(5)]
    assert TokenWriter.completed(url, **spec)["num_samples"] == 5
    with pytest.raises(CacheError, match="already holds"):
        TokenWriter.open(url, **{**spec, "num_inputs": 4})
    TokenWriter.open(url, overwrite=True, **{**spec, "num_inputs": 4})
    with pytest.raises(CacheError, match="incomplete"):
        TokenStore.open(url)
    # a non-empty prefix that is no Zarr store is never written into
    storage.write_bytes_atomic(f"{s3_bucket}/other/readme.txt", b"hi")
    with pytest.raises(CacheError, match="not a Zarr store"):
        TokenWriter.open(f"{s3_bucket}/other", overwrite=True, **spec)


def test_cache_import_to_s3(s3_bucket, tmp_path):
    from revq_pipe.cache.importer import import_tensor

    latents = structured_latents(70, 3)
    np.save(tmp_path / "x.npy", latents)
    url = f"{s3_bucket}/imported/train.zarr"
    manifest = import_tensor(tmp_path / "x.npy", url, split="train", chunk_size=32)
    local = import_tensor(tmp_path / "x.npy", tmp_path / "train.zarr", split="train", chunk_size=32)
    assert manifest.num_samples == local.num_samples == 70
    assert object_files(url) == store_files(tmp_path / "train.zarr")
    assert cache_info(url)["storage"]["latent_bytes_on_disk"] == cache_info(tmp_path / "train.zarr")["storage"][
        "latent_bytes_on_disk"]


# --- object-store failures: one line naming the URL, the cause and the fix (issue 20) ---------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "REVQ_DEBUG"}
    return subprocess.run([sys.executable, "-m", "revq_pipe.stages.cli", *args], capture_output=True, text=True,
                          env={**clean, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                               "AWS_MAX_ATTEMPTS": "1", **env}, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_storage_failures_are_one_line_naming_url_cause_and_fix(s3_bucket, s3_server, tmp_path):
    store = f"{s3_bucket}/val.zarr"
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint = ["--set", f"storage.endpoint_url={s3_server.endpoint_url}"]

    line = one_error_line(run_cli("cache", "info", store, *endpoint, env={"AWS_DEFAULT_REGION": "us-east-1"}))
    assert f"cannot use {store}: no credentials were found; set AWS_ACCESS_KEY_ID" in line

    line = one_error_line(run_cli("train", "--train-cache", store, "--run", str(tmp_path / "run"),
                                  "--set", "storage.endpoint_url=http://127.0.0.1:9", env=keys))
    assert f"cannot use {store}: the endpoint http://127.0.0.1:9 cannot be reached; check --set " \
           "storage.endpoint_url" in line

    images = tmp_path / "images"
    images.mkdir()
    missing = "s3://no-such-bucket-for-revq/val.zarr"
    line = one_error_line(run_cli("encode", "--images", str(images), "--out", missing, *endpoint, env=keys))
    assert f"cannot use {missing}: the bucket 'no-such-bucket-for-revq' does not exist; create it" in line

    debug = run_cli("cache", "info", store, *endpoint, env={"AWS_DEFAULT_REGION": "us-east-1", "REVQ_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "NoCredentialsError" in debug.stderr


def test_a_store_that_is_not_there_yet_is_no_failure(s3_bucket):
    storage.check_access(f"{s3_bucket}/new/val.zarr")  # a store about to be written: nothing to report
    with pytest.raises(FileNotFoundError):  # and a missing object is still a plain FileNotFoundError
        storage.read_bytes(f"{s3_bucket}/new/val.zarr/zarr.json")
