"""What evaluate, tokenize and tolerance share: the trained tokenizer with its matching VAE, images in
batches (decoded in DataLoader workers like stage one), the tokenizer's latents and 8-bit reconstructions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from revq_pipe.pipeline.images import to_uint8
from revq_pipe.pipeline.tokenizer import WEIGHTS_NAME, RevqTokenizer
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.datasets import ImageDataset
from revq_pipe.stages.distributed import DistContext
# stage one's decode-in-worker dataset and collate: evaluation reads images exactly like encoding
from revq_pipe.stages.datasets import DecodedImages, collate_decoded

TOKENIZER_DIR = "tokenizer"


# --- models ---------------------------------------------------------------------------------


def load_tokenizer(run: str | Path, device: torch.device) -> RevqTokenizer:
    """RUN/tokenizer, or a FileNotFoundError that says how to make one."""
    directory = Path(run) / TOKENIZER_DIR
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no trained tokenizer in {directory}; pass --run with the directory of a finished "
                                f"`revq-pipe train` run (it holds {TOKENIZER_DIR}/{WEIGHTS_NAME})")
    return RevqTokenizer.from_pretrained(directory, device=device)


def load_matching_vae(cfg: RevqConfig, tokenizer: RevqTokenizer, device: torch.device) -> FrozenVAE:
    """The VAE the tokenizer was trained with: the first local folder among vae.source and the recorded
    source, else the recorded source (a hub id), else vae.source.

    Refuses a VAE whose weights hash differs from the one recorded in the tokenizer.
    """
    recorded = tokenizer.vae_identity
    candidates = [s for s in (cfg.vae.source, recorded.get("source")) if s]
    local = [s for s in candidates if Path(s).expanduser().exists()]
    source = (local or [recorded.get("source") or cfg.vae.source])[0]
    vae = FrozenVAE.load(source, device=device, autocast_bf16=cfg.vae.autocast_bf16)
    expected, found = recorded.get("weights_sha256"), vae.identity["weights_sha256"]
    if expected is None:
        log(f"warning: the tokenizer records no VAE weights hash (its cache was imported); {source} is assumed "
            "to be the VAE its latents came from")
    elif expected != found:
        raise ValueError(f"the VAE at {source} has weights sha256 {found[:16]}..., but the tokenizer was trained "
                         f"on latents of {recorded.get('source')} (sha256 {expected[:16]}...); pass --vae with "
                         "that VAE (or set vae.source)")
    return vae


def tokenizer_identity(run: str | Path) -> dict:
    """{"dir", "model_sha256"}: which trained tokenizer produced a report or a token store."""
    directory = Path(run) / TOKENIZER_DIR
    digest = hashlib.sha256()
    with open(directory / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"dir": str(directory), "model_sha256": digest.hexdigest()}


def resolution_of(tokenizer: RevqTokenizer, cfg: RevqConfig) -> int:
    """Image side from the tokenizer's recorded recipe (what its cache was encoded with)."""
    resolution = tokenizer.image_recipe.get("resolution")
    if resolution is None:
        log(f"warning: the tokenizer records no image recipe; using data.resolution={cfg.data.resolution}")
        return cfg.data.resolution
    if resolution != cfg.data.resolution:
        log(f"note: using the tokenizer's recorded resolution {resolution} (data.resolution is {cfg.data.resolution})")
    return int(resolution)


# --- the tokenizer's latents ----------------------------------------------------------------


@dataclass
class TokenizedLatents:
    """One batch through the tokenizer; standardized tensors are (B, C, H, W)."""

    ids: torch.Tensor  # (B, T) int64
    clean: torch.Tensor  # standardized VAE latents
    quantized: torch.Tensor  # standardized codes, before the rectifier
    rectified: torch.Tensor  # standardized rectifier output
    decoder_input: torch.Tensor  # rectified latents at raw VAE scale: what ids_to_latents(ids) gives


@torch.no_grad()
def tokenize_latents(tokenizer: RevqTokenizer, latents: torch.Tensor) -> TokenizedLatents:
    """Raw VAE latents -> ids and every intermediate latent (the same operations as ids_to_latents)."""
    ids = tokenizer.latents_to_ids(latents)
    quantizer, normalizer = tokenizer.quantizer, tokenizer.normalizer
    quantized = quantizer.from_tokens(quantizer.lookup(ids))
    rectified = tokenizer.rectifier(quantized)
    return TokenizedLatents(ids=ids, clean=normalizer.normalize(latents.to(tokenizer.device, torch.float32)),
                            quantized=quantized, rectified=rectified,
                            decoder_input=normalizer.denormalize(rectified))


def add_latent_errors(sums: torch.Tensor, tokens: TokenizedLatents) -> None:
    """Accumulate (values, quantized SSE, rectified SSE) in the standardized latent space."""
    sums[0] += tokens.clean.numel()
    sums[1] += (tokens.quantized - tokens.clean).double().pow(2).sum()
    sums[2] += (tokens.rectified - tokens.clean).double().pow(2).sum()


@dataclass
class Reconstructions:
    """One batch of 8-bit images (B, 3, R, R) and the tokenizer's latents."""

    original: torch.Tensor
    vae: torch.Tensor  # decode(z): the continuous ceiling
    tokenizer: torch.Tensor  # decode(ids_to_latents(ids))
    tokens: TokenizedLatents


@torch.no_grad()
def reconstruct(tokenizer: RevqTokenizer, vae: FrozenVAE, images: torch.Tensor) -> Reconstructions:
    """Images in [-1, 1] -> the VAE's and the tokenizer's reconstructions, both rounded to 8 bits."""
    z = vae.encode(images)  # (B, C, H, W)
    tokens = tokenize_latents(tokenizer, z)
    return Reconstructions(original=to_uint8(images), vae=to_uint8(vae.decode(z)),
                           tokenizer=to_uint8(vae.decode(tokens.decoder_input)), tokens=tokens)


# --- images -----------------------------------------------------------------------------------


@dataclass
class ImageBatch:
    images: torch.Tensor | None  # (n, 3, R, R) in [-1, 1], on the device; None if all were unreadable
    indices: list[int]  # dataset indices of the decoded images
    skipped: list[tuple[int, str]]  # (dataset index, reason) of unreadable ones


def image_batches(dataset: ImageDataset, batches: list[list[int]], resolution: int, num_workers: int,
                  device: torch.device) -> Iterator[ImageBatch]:
    """Decode and preprocess the given index batches in DataLoader workers, in order."""
    if not batches:
        return
    loader = DataLoader(DecodedImages(dataset, resolution), batch_sampler=batches, collate_fn=collate_decoded,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if num_workers > 0 else None)
    for batch in loader:
        images = batch["images"]
        yield ImageBatch(images=None if images is None else images.to(device, non_blocking=True),
                         indices=batch["indices"], skipped=batch["skipped"])


def rank_batches(num_items: int, batch_size: int, ctx: DistContext) -> list[list[int]]:
    """This rank's contiguous share of [0, num_items), cut into batches (rank 0 holds the first items)."""
    lo, hi = ctx.rank * num_items // ctx.world_size, (ctx.rank + 1) * num_items // ctx.world_size
    return [list(range(b, min(b + batch_size, hi))) for b in range(lo, hi, batch_size)]
