"""Tiny synthetic latent caches and the tiny model settings that stage two's tests train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revq_pipe.cache.importer import import_tensor

SHAPE = (8, 4, 4)  # (C, H, W): 128 values
TINY = [
    "quantizer.num_tokens=32", "quantizer.codebook_size=16", "rectifier.width=32", "rectifier.depth=1",
    "rectifier.head_dim=16", "train.epochs=3", "train.batch_size=32", "train.log_every=4", "train.device=cpu",
]


def structured_latents(n: int, seed: int, shape=SHAPE) -> np.ndarray:
    """Latents on a noisy 6-dimensional subspace with per-element offsets and scales (shared by all splits)."""
    size = int(np.prod(shape))
    fixed = np.random.default_rng(1234)
    basis, offset, scale = fixed.normal(size=(6, size)), fixed.normal(0, 2, size), fixed.uniform(0.5, 2, size)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) @ basis + 0.3 * rng.normal(size=(n, size))
    return (x * scale + offset).reshape(n, *shape).astype(np.float32)


def make_cache(folder: Path, split: str, latents: np.ndarray, **kwargs) -> Path:
    """folder/<split>.zarr imported from the latents (written to folder/<split>.npy first)."""
    src = folder / f"{split}.npy"
    np.save(src, latents)
    out = folder / f"{split}.zarr"
    import_tensor(src, out, split=split, chunk_size=64, **kwargs)
    return out
