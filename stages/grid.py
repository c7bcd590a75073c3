"""A reconstruction grid PNG: one row per image source (original | VAE | tokenizer), one column per image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from revq_pipe.pipeline.files import atomic_path

GAP = 2  # pixels of white between tiles


def write_grid(path: str | os.PathLike, rows: list[torch.Tensor], labels: Sequence[str] | None = None) -> Path:
    """Tile uint8 image batches (n, 3, R, R), all the same shape, row by row into one PNG (written atomically).

    `labels` (one per row) are written in a margin left of the rows, so a reader knows which is which.
    """
    if not rows or any(r.shape != rows[0].shape or r.dtype != torch.uint8 for r in rows):
        raise ValueError("write_grid needs one or more uint8 batches of the same shape (n, 3, R, R)")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"write_grid got {len(labels)} labels for {len(rows)} rows")
    n, _, size, _ = rows[0].shape
    step = size + GAP
    font = ImageFont.load_default()
    margin = 0 if labels is None else max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font))
                                          for t in labels) + 3 * GAP
    canvas = np.full((len(rows) * step - GAP, margin + max(n, 1) * step - GAP, 3), 255, dtype=np.uint8)
    for r, batch in enumerate(rows):
        tiles = batch.permute(0, 2, 3, 1).cpu().numpy()  # (n, R, R, 3)
        for c in range(n):
            canvas[r * step:r * step + size, margin + c * step:margin + c * step + size] = tiles[c]
    image = Image.fromarray(canvas)
    for r, text in enumerate(labels or []):
        ImageDraw.Draw(image).text((GAP, r * step + size // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
