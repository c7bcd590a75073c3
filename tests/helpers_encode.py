"""Stage one's test inputs and the ways the tests run it: in this process, or as ranks of tests/_encode_driver.py.

    data = make_encode_data(root)   # 42 small images in two classes (two unreadable) and a tiny VAE
    encode_in_process(data, out)    # an uninterrupted 1-process encode with the driver's settings

The conftest fixtures `encode_data` and `encode_reference` build these once per session.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from revq_pipe.stages.config import load_config
from revq_pipe.stages.encode import run_encode
from tests.helpers_processes import one_thread
from tests.helpers_vae import make_tiny_vae

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "_encode_driver.py"
CORRUPT = {"cat/c06.png": b"", "dog/d05.png": None}  # empty file, truncated PNG


def make_encode_data(root: Path) -> dict[str, Path]:
    """42 small images of varied sizes in two classes under root/images, two of them unreadable, and a tiny VAE."""
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
    """The driver's settings (batch 4, units of 8, no decoding workers), with `encode` overrides."""
    settings = {"batch_size": 4, "chunk_size": 8, "num_workers": 0, **encode}
    flags = {"vae.source": str(vae), "vae.device": "cpu", "data.resolution": 32}
    flags.update({f"encode.{k}": v for k, v in settings.items()})
    return load_config(None, [], flags)


def encode_in_process(data, out, overwrite=False):
    with one_thread():
        return run_encode(config(data["vae"]), split="train", images=str(data["images"]), out=str(out),
                          overwrite=overwrite)


def driver(data, out, *extra):
    """Command line of the driver (run_ranks starts it as several ranks)."""
    return [sys.executable, str(DRIVER), "--images", str(data["images"]), "--vae", str(data["vae"]), "--out", str(out),
            *extra]


def env():
    """Same thread settings in every process, so a 1-process and a 2-process run use the same kernels."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
