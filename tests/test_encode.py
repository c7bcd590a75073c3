"""Stage one end to end: images -> latent cache, multi-process equality, kill and resume, errors."""

import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.pipeline.images import decode_image, preprocess
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.encode import run_encode
from tests.helpers_cache import store_files
from tests.helpers_encode import CORRUPT, config, driver, encode_in_process, env
from tests.helpers_processes import one_thread, run_ranks


def test_end_to_end(encode_data, tmp_path):
    out = tmp_path / "train.zarr"
    images = str(encode_data["images"])
    manifest = run_encode(config(encode_data["vae"], num_workers=2), split="train", images=images, out=str(out),
                          overwrite=False)
    cache = LatentCache.open(out)
    assert manifest.complete and cache.num_samples == 40 and cache.latent_shape == (32, 4, 4)
    assert sorted(manifest.skipped["keys"]) == sorted(CORRUPT)
    assert "empty file" in manifest.skipped["reasons"][manifest.skipped["keys"].index("cat/c06.png")]
    assert manifest.image["resolution"] == 32 and manifest.vae["class"] == "AutoencoderDC"
    assert (tmp_path / "train.config.yaml").is_file()

    keys = cache.keys()
    assert keys == sorted(k for k in keys) and not set(keys) & set(CORRUPT)
    assert cache.labels().tolist() == [0 if k.startswith("cat/") else 1 for k in keys]

    vae = FrozenVAE.load(str(encode_data["vae"]), device="cpu")
    batch = torch.stack([preprocess(decode_image((encode_data["images"] / k).read_bytes(), k), 32) for k in keys])
    direct = vae.encode(batch).numpy()
    stored = cache.load_latents().float().numpy()
    assert stored.dtype == np.float32 and cache.load_latents().dtype == torch.float16
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=1e-4)  # float16 rounding
    np.testing.assert_allclose(cache.mean.numpy(), stored.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)

    # the same command on a finished store is a no-op; other settings are refused
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    again = run_encode(config(encode_data["vae"]), split="train", images=images, out=str(out), overwrite=False)
    assert again.num_samples == cache.num_samples
    assert before == {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.raises(CacheError, match="--overwrite"):
        run_encode(config(encode_data["vae"]), split="val", images=images, out=str(out), overwrite=False)


def test_a_finished_store_of_other_images_is_refused_with_what_differs(encode_data, encode_reference, tmp_path):
    """Other images of the same count, VAE and resolution are not "this complete cache": the source is in the spec."""
    other = tmp_path / "other"
    shutil.copytree(encode_data["images"], other)
    (other / "cat" / "c00.png").write_bytes((other / "cat" / "c02.png").read_bytes())
    out = tmp_path / "train.zarr"
    shutil.copytree(encode_reference, out)
    with pytest.raises(CacheError, match="already holds a complete 'train' cache.*--overwrite") as refused:
        run_encode(config(encode_data["vae"]), split="train", images=str(other), out=str(out), overwrite=False)
    assert f"(stored -> now: source: '{encode_data['images']}' -> '{other}')" in str(refused.value)
    assert store_files(out) == store_files(encode_reference)  # untouched


def test_wrong_resolution_stops_before_writing(encode_data, tmp_path):
    cfg = config(encode_data["vae"])
    cfg.data.resolution = 60
    out = tmp_path / "bad.zarr"
    with pytest.raises(ValueError, match=r"resolution 60 .*multiple of 8"):
        run_encode(cfg, split="train", images=str(encode_data["images"]), out=str(out), overwrite=False)
    assert not out.exists()


def test_wrong_paths_and_empty_dataset(encode_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_images"):
        run_encode(config(encode_data["vae"]), split="train", images=str(tmp_path / "no_such_images"),
                   out=str(tmp_path / "a.zarr"), overwrite=False)
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        run_encode(config(tmp_path / "no_such_vae"), split="train", images=str(encode_data["images"]),
                   out=str(tmp_path / "a.zarr"), overwrite=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        run_encode(config(encode_data["vae"]), split="train", images=str(tmp_path / "empty"),
                   out=str(tmp_path / "a.zarr"), overwrite=False)


@pytest.mark.slow
def test_two_processes_write_the_same_bytes(encode_data, encode_reference, tmp_path):
    out = tmp_path / "two.zarr"
    result = run_ranks(driver(encode_data, out, "--workers", "1"), env(), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert store_files(out) == store_files(encode_reference)


@pytest.mark.slow
def test_kill_and_resume_writes_the_same_bytes(encode_data, encode_reference, tmp_path, capsys):
    out = tmp_path / "resumed.zarr"
    process = subprocess.Popen(driver(encode_data, out, "--unit-delay", "0.3"), env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "_staging").glob("unit_*.npz"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    staged = len(list((out / "_staging").glob("unit_*.npz")))
    assert 2 <= staged < 6, staged  # killed mid-way: 6 units in all
    with pytest.raises(CacheError, match="incomplete"):
        LatentCache.open(out)

    encode_in_process(encode_data, out)
    assert f"resuming: {staged} of 6 units already encoded" in capsys.readouterr().err
    assert store_files(out) == store_files(encode_reference)


def test_files_that_are_no_images_are_counted_in_the_manifest(encode_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(encode_data["images"], images)
    (images / "cat" / "README.txt").write_text("not an image")
    (images / "cat" / "c00.gif").write_bytes((images / "cat" / "c00.png").read_bytes())  # a PNG under .gif
    with one_thread():
        manifest = run_encode(config(encode_data["vae"]), split="train", images=str(images),
                              out=str(tmp_path / "c.zarr"), overwrite=False)
    assert manifest.ignored == {"count": 1, "keys": ["cat/README.txt"]} and manifest.source == str(images)
    assert "cat/c00.gif" in LatentCache.open(tmp_path / "c.zarr").keys()
    assert LatentCache.open(tmp_path / "c.zarr").manifest.ignored["count"] == 1
