"""Stage one end to end: images -> latent cache, multi-process equality, kill and resume, errors."""

import io
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.pipeline.images import decode_image, preprocess
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.config import load_config
from revq_pipe.stages.encode import run_encode
from tests.helpers_processes import one_thread, run_ranks
from tests.helpers_vae import make_tiny_vae

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "_encode_driver.py"
CORRUPT = {"cat/c06.png": b"", "dog/d05.png": None}  # empty file, truncated PNG


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """42 small images of varied sizes in two classes, two of them unreadable, and a tiny VAE."""
    root = tmp_path_factory.mktemp("encode")
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(42):
        cls, name = ("cat", f"c{i:02d}.png") if i % 2 == 0 else ("dog", f"d{i:02d}.png")
        key = f"{cls}/{name}"
        size = (int(rng.integers(32, 72)), int(rng.integers(32, 72)))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
        payload = buffer.getvalue()
        if key in CORRUPT:
            payload = CORRUPT[key] if CORRUPT[key] is not None else payload[: len(payload) // 2]
        (images / cls).mkdir(parents=True, exist_ok=True)
        (images / key).write_bytes(payload)
    return {"root": root, "images": images, "vae": make_tiny_vae(root)}


def config(vae, **encode):
    settings = {"batch_size": 4, "chunk_size": 8, "num_workers": 0, **encode}
    flags = {"vae.source": str(vae), "vae.device": "cpu", "data.resolution": 32}
    flags.update({f"encode.{k}": v for k, v in settings.items()})
    return load_config(None, [], flags)


def driver(data, out, *extra):
    """Command line of the driver (run_ranks starts it as several ranks)."""
    return [sys.executable, str(DRIVER), "--images", str(data["images"]), "--vae", str(data["vae"]), "--out", str(out),
            *extra]


def env():
    """Same thread settings in every process, so a 1-process and a 2-process run use the same kernels."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_end_to_end(data, tmp_path):
    out = tmp_path / "train.zarr"
    manifest = run_encode(config(data["vae"], num_workers=2), split="train", images=str(data["images"]),
                          out=str(out), overwrite=False)
    cache = LatentCache.open(out)
    assert manifest.complete and cache.num_samples == 40 and cache.latent_shape == (32, 4, 4)
    assert sorted(manifest.skipped["keys"]) == sorted(CORRUPT)
    assert "empty file" in manifest.skipped["reasons"][manifest.skipped["keys"].index("cat/c06.png")]
    assert manifest.image["resolution"] == 32 and manifest.vae["class"] == "AutoencoderDC"
    assert (tmp_path / "train.config.yaml").is_file()

    keys = cache.keys()
    assert keys == sorted(k for k in keys) and not set(keys) & set(CORRUPT)
    assert cache.labels().tolist() == [0 if k.startswith("cat/") else 1 for k in keys]

    vae = FrozenVAE.load(str(data["vae"]), device="cpu")
    batch = torch.stack([preprocess(decode_image((data["images"] / k).read_bytes(), k), 32) for k in keys])
    direct = vae.encode(batch).numpy()
    stored = cache.load_latents().float().numpy()
    assert stored.dtype == np.float32 and cache.load_latents().dtype == torch.float16
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=1e-4)  # float16 rounding
    np.testing.assert_allclose(cache.mean.numpy(), stored.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)

    # the same command on a finished store is a no-op; other settings are refused
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    again = run_encode(config(data["vae"]), split="train", images=str(data["images"]), out=str(out), overwrite=False)
    assert again.num_samples == cache.num_samples
    assert before == {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.raises(CacheError, match="--overwrite"):
        run_encode(config(data["vae"]), split="val", images=str(data["images"]), out=str(out), overwrite=False)


def test_wrong_resolution_stops_before_writing(data, tmp_path):
    cfg = config(data["vae"])
    cfg.data.resolution = 60
    out = tmp_path / "bad.zarr"
    with pytest.raises(ValueError, match=r"resolution 60 .*multiple of 8"):
        run_encode(cfg, split="train", images=str(data["images"]), out=str(out), overwrite=False)
    assert not out.exists()


def test_wrong_paths_and_empty_dataset(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_images"):
        run_encode(config(data["vae"]), split="train", images=str(tmp_path / "no_such_images"),
                   out=str(tmp_path / "a.zarr"), overwrite=False)
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        run_encode(config(tmp_path / "no_such_vae"), split="train", images=str(data["images"]),
                   out=str(tmp_path / "a.zarr"), overwrite=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        run_encode(config(data["vae"]), split="train", images=str(tmp_path / "empty"),
                   out=str(tmp_path / "a.zarr"), overwrite=False)


def encode_in_process(data, out, overwrite=False):
    with one_thread():
        return run_encode(config(data["vae"]), split="train", images=str(data["images"]), out=str(out),
                          overwrite=overwrite)


@pytest.fixture(scope="module")
def reference_store(data):
    """An uninterrupted 1-process run with the driver's settings."""
    out = data["root"] / "reference.zarr"
    encode_in_process(data, out)
    return out


@pytest.mark.slow
def test_two_processes_write_the_same_bytes(data, reference_store, tmp_path):
    out = tmp_path / "two.zarr"
    result = run_ranks(driver(data, out, "--workers", "1"), env(), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert store_files(out) == store_files(reference_store)


@pytest.mark.slow
def test_kill_and_resume_writes_the_same_bytes(data, reference_store, tmp_path, capsys):
    out = tmp_path / "resumed.zarr"
    process = subprocess.Popen(driver(data, out, "--unit-delay", "0.3"), env=env(),
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

    encode_in_process(data, out)
    assert f"resuming: {staged} of 6 units already encoded" in capsys.readouterr().err
    assert store_files(out) == store_files(reference_store)


def test_files_that_are_no_images_are_counted_in_the_manifest(data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    (images / "cat" / "README.txt").write_text("not an image")
    (images / "cat" / "c00.gif").write_bytes((images / "cat" / "c00.png").read_bytes())  # a PNG under .gif
    with one_thread():
        manifest = run_encode(config(data["vae"]), split="train", images=str(images), out=str(tmp_path / "c.zarr"),
                              overwrite=False)
    assert manifest.ignored == {"count": 1, "keys": ["cat/README.txt"]} and manifest.source == str(images)
    assert "cat/c00.gif" in LatentCache.open(tmp_path / "c.zarr").keys()
    assert LatentCache.open(tmp_path / "c.zarr").manifest.ignored["count"] == 1
