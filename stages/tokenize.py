"""Export the token ids of a whole split to a Zarr token store (cache/token_store.py) for generative models.

From images (VAE encoder, then latents_to_ids) or from a latent cache (latents_to_ids of the cached
latents). Cached latents are rounded to the cache's dtype (float16 by default), so a few ids can
differ from those of the image path; the store records which source it came from.

Resumable and multi-rank like stage one: the inputs are cut into units of encode.chunk_size; rank r
tokenizes the unstaged units u with u % world_size == r, in fixed batches that never cross a unit,
so the ids do not depend on the world size or on interruptions. The resolved config is written to
<store>.config.yaml before work starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import zarr

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.cache.token_store import TokenWriter
from revq_pipe.pipeline.images import recipe
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig, save_config
from revq_pipe.stages.console import log, progress
from revq_pipe.stages.datasets import open_image_dataset
from revq_pipe.stages.distributed import DistContext, init_distributed, shutdown_distributed
from revq_pipe.stages.distributed import run_on_main
from revq_pipe.stages.eval_common import image_batches, load_matching_vae, load_tokenizer, resolution_of, tokenizer_identity

CACHE_NOTE = ("ids computed from cached latents, which are rounded to the cache's dtype: a few ids can differ from "
              "those of the image path (VAE encoder in float32)")


def run_tokenize(cfg: RevqConfig, *, run: str, split: str, images: str | None, cache: str | None, out: str,
                 overwrite: bool) -> Path:
    """Write the ids of `images` (or of the latents in `cache`) to the token store `out`; returns its path."""
    if (images is None) == (cache is None):
        raise ValueError("pass exactly one source: --images PATH (tokenize through the VAE) or --cache STORE "
                         "(tokenize cached latents)")
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(cfg.vae.device)
    try:
        return _tokenize(cfg, Path(run), split, images, cache, Path(out.replace("{split}", split)), overwrite, ctx)
    finally:
        if owns_process_group:
            shutdown_distributed(ctx)


def _tokenize(cfg: RevqConfig, run: Path, split: str, images: str | None, cache: str | None, out: Path,
              overwrite: bool, ctx: DistContext) -> Path:
    # --- setup: tokenizer, source, store ---------------------------------------------------------
    tokenizer = load_tokenizer(run, ctx.device)
    source = (_CacheSource(cache, tokenizer, cfg.tokenize.batch_size, ctx) if cache is not None
              else _ImageSource(images, tokenizer, cfg, ctx))
    layout = {"num_tokens": tokenizer.num_tokens, "token_dim": tokenizer.token_dim,
              "codebook_size": tokenizer.codebook_size, "latent_shape": list(tokenizer.latent_shape),
              "order": "the latent flattened in (C, H, W) order, cut into T contiguous tokens of d values",
              "positions": tokenizer.token_layout()}
    spec = dict(num_inputs=source.num_inputs, split=split, num_tokens=tokenizer.num_tokens,
                codebook_size=tokenizer.codebook_size, layout=layout, tokenizer=tokenizer_identity(run),
                vae=source.vae_identity, source=source.description, chunk_size=cfg.encode.chunk_size)
    writer = run_on_main(ctx, lambda: TokenWriter.open(out, overwrite=overwrite, create=True, **spec))
    if not ctx.is_main:
        writer = TokenWriter.open(out, create=False, **spec)
    if ctx.is_main:
        log(f"resolved config written to {save_config(cfg, out.with_suffix('.config.yaml'))}")

    # --- tokenize this rank's pending units ----------------------------------------------------------
    units = writer.pending_units(ctx.rank, ctx.world_size)
    with progress(sum(len(range(*writer.unit_range(u))) for u in units), f"tokenize {split}",
                  enabled=ctx.is_main) as bar:
        for u, ids, labels, keys, skipped in source.units(writer, units):
            writer.write_unit(u, ids, labels, keys, skipped)
            bar.advance(len(keys) + len(skipped))
    ctx.barrier()

    # --- finish: assemble the store on rank 0 ---------------------------------------------------------
    attrs = run_on_main(ctx, writer.finalize, share=True)
    log(f"wrote {attrs['num_samples']} x {tokenizer.num_tokens} token ids ({attrs['ids_dtype']}) to {out}"
        + (f"; skipped {attrs['skipped']['count']} unreadable images (listed in the store)"
           if attrs["skipped"]["count"] else ""))
    return out


class _ImageSource:
    """Images -> VAE encoder -> ids, in fixed batches per unit."""

    def __init__(self, images: str, tokenizer: RevqTokenizer, cfg: RevqConfig, ctx: DistContext) -> None:
        self.dataset = open_image_dataset(images)
        self.vae = load_matching_vae(cfg, tokenizer, ctx.device)
        self.resolution = resolution_of(tokenizer, cfg)
        self.tokenizer, self.cfg, self.device = tokenizer, cfg, ctx.device
        self.num_inputs = len(self.dataset)
        self.vae_identity = self.vae.identity
        self.description = {"kind": "images", "path": str(images), "image": recipe(self.resolution)}

    def units(self, writer: TokenWriter, units: list[int]):
        """Yield (unit, ids (n, T), labels (n,), keys, skipped) for each unit, in order."""
        size = self.cfg.tokenize.batch_size
        batches = [list(range(b, min(b + size, writer.unit_range(u)[1])))
                   for u in units for b in range(*writer.unit_range(u), size)]
        pending = iter(units)
        unit = next(pending, None)
        ids, indices, skipped = [], [], []
        for batch in image_batches(self.dataset, batches, self.resolution, self.cfg.encode.num_workers, self.device):
            if batch.images is not None:
                ids.append(self.tokenizer.latents_to_ids(self.vae.encode(batch.images)).cpu().numpy())
                indices += batch.indices
            skipped += [(self.dataset.key(i), reason) for i, reason in batch.skipped]
            start, stop = writer.unit_range(unit)
            if len(indices) + len(skipped) == stop - start:  # the unit's last batch has arrived
                yield (unit, np.concatenate(ids) if ids else np.zeros((0, self.tokenizer.num_tokens), np.int64),
                       np.asarray([self.dataset.label(i) for i in indices], dtype=np.int64),
                       [self.dataset.key(i) for i in indices], skipped)
                ids, indices, skipped = [], [], []
                unit = next(pending, None)


class _CacheSource:
    """Cached latents -> ids; a cache has no unreadable inputs."""

    def __init__(self, path: str, tokenizer: RevqTokenizer, batch_size: int, ctx: DistContext) -> None:
        cache = LatentCache.open(path)
        expected, found = tokenizer.vae_identity.get("weights_sha256"), cache.manifest.vae.get("weights_sha256")
        if tuple(cache.latent_shape) != tokenizer.latent_shape or (expected and found and expected != found):
            raise CacheError(f"{path} holds {tuple(cache.latent_shape)} latents of VAE {cache.manifest.vae}, but the "
                             f"tokenizer expects {tokenizer.latent_shape} latents of {tokenizer.vae_identity}; "
                             "tokenize a cache encoded with the tokenizer's VAE")
        self.latents = zarr.open_group(cache.path, mode="r")["latents"]  # the cache's documented member
        self.labels, self.keys = cache.labels(), cache.keys()
        self.tokenizer, self.batch_size, self.device = tokenizer, batch_size, ctx.device
        self.num_inputs = cache.num_samples
        self.vae_identity = cache.manifest.vae
        self.description = {"kind": "cache", "path": str(path), "latent_dtype": cache.manifest.latent_dtype,
                            "image": cache.manifest.image, "note": CACHE_NOTE}

    def units(self, writer: TokenWriter, units: list[int]):
        for u in units:
            start, stop = writer.unit_range(u)
            ids = []
            for b in range(start, stop, self.batch_size):
                z = torch.from_numpy(np.asarray(self.latents[b:min(b + self.batch_size, stop)], dtype=np.float32))
                ids.append(self.tokenizer.latents_to_ids(z.to(self.device)).cpu().numpy())
            yield u, np.concatenate(ids), self.labels[start:stop], self.keys[start:stop], []
