"""A reconstruction grid PNG: one row per image source (original | VAE | tokenizer), one column per image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GAP = 2  # pixels of white between tiles


def write_grid(path: str | os.PathLike, rows: list[torch.Tensor]) -> Path:
    """Tile uint8 image batches (n, 3, R, R), all the same shape, row by row into one PNG (written atomically)."""
    if not rows or any(r.shape != rows[0].shape or r.dtype != torch.uint8 for r in rows):
        raise ValueError("write_grid needs one or more uint8 batches of the same shape (n, 3, R, R)")
    n, _, size, _ = rows[0].shape
    step = size + GAP
    canvas = np.full((len(rows) * step - GAP, max(n, 1) * step - GAP, 3), 255, dtype=np.uint8)
    for r, batch in enumerate(rows):
        tiles = batch.permute(0, 2, 3, 1).cpu().numpy()  # (n, R, R, 3)
        for c in range(n):
            canvas[r * step:r * step + size, c * step:c * step + size] = tiles[c]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
