"""The evaluation's pictures: the reconstruction grid and the per-position codebook-usage map.

The grid has one row per image source (original | VAE | tokenizer) and one column per image; tiles are
upscaled by nearest neighbour to at least DISPLAY_SIDE pixels (the demo's 64 px tiles are too small to
judge), and a caption line under a tile can carry its number (the evaluation writes each reconstruction's
PSNR there). The usage map paints, for every element of the (C, H, W) latent, the usage of the token
position that covers it, one panel per channel: dead codes concentrate by position, and this shows where.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from revq_pipe.pipeline.files import atomic_path

GAP = 2  # pixels of white between tiles
DISPLAY_SIDE = 128  # tiles smaller than this are shown at an integer multiple of their size
CAPTION_PAD = 2  # pixels around a caption line


def display_scale(side: int) -> int:
    """The nearest-neighbour factor that shows an image of `side` pixels at least DISPLAY_SIDE wide."""
    return max(1, math.ceil(DISPLAY_SIDE / side))


def write_grid(path: str | os.PathLike, rows: list[torch.Tensor], labels: Sequence[str] | None = None,
               captions: Sequence[Sequence[str] | None] | None = None, scale: int | None = None) -> Path:
    """Tile uint8 image batches (n, 3, R, R), all the same shape, row by row into one PNG (written atomically).

    Args:
        rows: one batch per row.
        labels: one per row, written in a margin left of the rows.
        captions: per row, None or one text per tile, written on a line under the tile.
        scale: nearest-neighbour upscaling of every tile (default `display_scale(R)`).
    """
    if not rows or any(r.shape != rows[0].shape or r.dtype != torch.uint8 for r in rows):
        raise ValueError("write_grid needs one or more uint8 batches of the same shape (n, 3, R, R)")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"write_grid got {len(labels)} labels for {len(rows)} rows")
    captions = list(captions) if captions is not None else [None] * len(rows)
    if len(captions) != len(rows) or any(c is not None and len(c) != rows[0].shape[0] for c in captions):
        raise ValueError("write_grid needs, per row, None or one caption per tile")
    n, _, side, _ = rows[0].shape
    scale = scale or display_scale(side)
    size = side * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = measure.textbbox((0, 0), "0.0 dB", font=font)[3] + 2 * CAPTION_PAD
    heights = [size + (line if c is not None else 0) for c in captions]
    tops = np.cumsum([0, *[h + GAP for h in heights]])[:-1]
    margin = 0 if labels is None else max(int(measure.textlength(t, font=font)) for t in labels) + 3 * GAP
    step = size + GAP
    canvas = np.full((int(tops[-1]) + heights[-1], margin + max(n, 1) * step - GAP, 3), 255, dtype=np.uint8)
    for r, batch in enumerate(rows):
        tiles = batch.permute(0, 2, 3, 1).cpu().numpy().repeat(scale, axis=1).repeat(scale, axis=2)  # (n, S, S, 3)
        for c in range(n):
            canvas[tops[r]:tops[r] + size, margin + c * step:margin + c * step + size] = tiles[c]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for r, text in enumerate(labels or []):
        draw.text((GAP, int(tops[r]) + size // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    for r, texts in enumerate(captions):
        for c, text in enumerate(texts or []):
            draw.text((margin + c * step + size // 2, int(tops[r]) + size + CAPTION_PAD), text, fill=(0, 0, 0),
                      font=font, anchor="ma")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def usage_per_element(usage: torch.Tensor, latent_shape: tuple[int, int, int]) -> np.ndarray:
    """(T,) usage per token position -> (C, H, W): each latent element gets the usage of the token covering it.

    Tokens are T contiguous runs of d = C*H*W / T values of the latent flattened in (C, H, W) order
    (RevqTokenizer.token_layout), so element i belongs to position i // d.
    """
    size = math.prod(latent_shape)
    if size % usage.numel():
        raise ValueError(f"{usage.numel()} token positions do not tile a latent of shape {latent_shape}")
    return usage.double().cpu().numpy().repeat(size // usage.numel()).reshape(latent_shape)


def write_usage_map(path: str | os.PathLike, usage: torch.Tensor, latent_shape: tuple[int, int, int],
                    title: str) -> Path:
    """A heat map of codebook usage per token position over the latent layout, one panel per channel."""
    values = usage_per_element(usage, latent_shape)  # (C, H, W)
    channels = latent_shape[0]
    columns = min(channels, 8)
    grid_rows = math.ceil(channels / columns)
    fig = Figure(figsize=(1.3 * columns + 1.2, 1.3 * grid_rows + 0.8))
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    axes = np.atleast_1d(fig.subplots(grid_rows, columns, squeeze=False)).ravel()
    for c, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if c >= channels:
            ax.set_visible(False)
            continue
        shown = ax.imshow(values[c], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"channel {c}", fontsize=7)
    fig.colorbar(shown, ax=list(axes[:channels]), fraction=0.03, label="codes used / K")
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
