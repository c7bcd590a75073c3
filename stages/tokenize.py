"""Export the token ids of a whole split to a Zarr token store (cache/token_store.py) for generative models.

From images (VAE encoder, then latents_to_ids) or from a latent cache (latents_to_ids of the cached
latents). Cached latents are rounded to the cache's dtype (float16 by default), so a few ids can
differ from those of the image path; the store records which source it came from.

`tokenize.augment` (--augment, pipeline/views.py AUGMENTS) stores every view of every image,
one row per view: each image is decoded once (at the views' source resolution) and its views are
cut from it and encoded together. A cache holds latents, not images, so it has only the one view.

Resumable and multi-rank like stage one: the inputs are cut into units of tokenize.chunk_size; the ranks
share out the unstaged units, tokenize them in fixed batches that never cross a unit, and assemble the
store together, so the ids and the store's bytes do not depend on the world size or on interruptions.
Rerunning a finished export with the same tokenizer, source and settings is a no-op. The resolved config
is written to <store>.config.yaml once the store is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache import storage
from revq_pipe.cache.token_store import TokenWriter
from revq_pipe.pipeline.images import recipe
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.pipeline.views import ViewSet, view_set
from revq_pipe.stages.config import RevqConfig, save_config_beside
from revq_pipe.stages.console import log, progress
from revq_pipe.stages.datasets import UnitOutputs, map_units, open_image_dataset
from revq_pipe.stages.distributed import DistContext, distributed, run_on_main
from revq_pipe.stages.run_dir import TOKENIZER_DIR, image_resolution, load_tokenizer, tokenizer_identity, tokenizer_vae
from revq_pipe.stages.skipped import describe_skipped

CACHE_NOTE = ("ids computed from cached latents, which are rounded to the cache's dtype: a few ids can differ from "
              "those of the image path (VAE encoder in float32)")


def run_tokenize(cfg: RevqConfig, *, run: str, split: str | None, images: str | None, cache: str | None, out: str,
                 overwrite: bool) -> Path:
    """Write the ids of `images` (or of the latents in `cache`) to the token store `out`; returns its path.

    `split` is recorded in the store; None takes the cache's own split name (a cache source only).
    """
    if (images is None) == (cache is None):
        raise ValueError("pass exactly one source: --images PATH (tokenize through the VAE) or --cache STORE "
                         "(tokenize cached latents)")
    if split is None and images is not None:
        raise ValueError(f"pass --split NAME to record which split the images at {images} are")
    with distributed(cfg.vae.device, cfg.dist.timeout_minutes) as ctx:
        return _tokenize(cfg, Path(run), split, images, cache, out, overwrite, ctx)


def _tokenize(cfg: RevqConfig, run: Path, split: str | None, images: str | None, cache: str | None, out: str,
              overwrite: bool, ctx: DistContext) -> Path:
    # --- setup: tokenizer, source, store ---------------------------------------------------------
    tokenizer = load_tokenizer(run, ctx.device, search_memory_mb=cfg.quantizer.search_memory_mb)
    source = (_CacheSource(cache, tokenizer, cfg, ctx) if cache is not None
              else _ImageSource(images, tokenizer, cfg, ctx))
    split = split or source.split
    out = out.replace("{split}", split)
    out = out if storage.is_url(out) else Path(out)  # a URL is never taken for a local path
    options = cfg.storage_options()
    layout = {"num_tokens": tokenizer.num_tokens, "token_dim": tokenizer.token_dim,
              "codebook_size": tokenizer.codebook_size, "latent_shape": list(tokenizer.latent_shape),
              "order": "the latent flattened in (C, H, W) order, cut into T contiguous tokens of d values",
              "positions": tokenizer.token_layout()}
    spec = dict(num_inputs=source.num_inputs, split=split, num_tokens=tokenizer.num_tokens,
                codebook_size=tokenizer.codebook_size, layout=layout,
                tokenizer=tokenizer_identity(run / TOKENIZER_DIR), vae=source.vae_identity,
                source=source.description, augment=source.views.describe(), chunk_size=cfg.tokenize.chunk_size)
    finished = None if overwrite else TokenWriter.completed(out, options, **spec)
    if finished is not None:
        log(f"{out} already holds this complete token export ({finished['num_samples']} x {tokenizer.num_tokens} "
            "ids); nothing to do (pass --overwrite to export again)")
        return out
    writer = run_on_main(ctx, lambda: TokenWriter.open(out, overwrite=overwrite, create=True, options=options, **spec))
    if not ctx.is_main:
        writer = TokenWriter.open(out, create=False, options=options, **spec)
    if ctx.is_main:
        log(f"resolved config written to {save_config_beside(cfg, out, options)}")

    # --- tokenize this rank's pending units ----------------------------------------------------------
    units = writer.pending_units(ctx.rank, ctx.world_size, run_on_main(ctx, writer.missing_units, share=True))
    with progress(sum(len(range(*writer.unit_range(u))) for u in units), f"tokenize {split}",
                  enabled=ctx.is_main, unit=source.unit) as bar:
        for part in source.units(writer, units):
            writer.write_unit(part.unit, part.outputs, part.labels, part.keys, part.skipped)
            bar.advance(len(part.keys) + len(part.skipped))
    ctx.barrier()

    # --- finish: every rank assembles its share of the store ----------------------------------------
    with ctx.phase("assemble the store"):
        attrs = writer.finalize(collective=ctx)
    log(f"wrote {attrs['num_samples']} x {tokenizer.num_tokens} token ids ({attrs['ids_dtype']}) of split "
        f"{split!r} to {out}: {attrs['num_images']} images x {source.views.num_views} views "
        f"({', '.join(source.views.names)})")
    skipped = list(zip(attrs["skipped"]["keys"], attrs["skipped"]["reasons"]))
    if skipped:
        log(describe_skipped(skipped, what="unreadable images (listed in the store)"))
    return out


class _ImageSource:
    """Images -> views -> VAE encoder -> ids, in fixed batches per unit."""

    unit = "img"

    def __init__(self, images: str, tokenizer: RevqTokenizer, cfg: RevqConfig, ctx: DistContext) -> None:
        self.dataset = open_image_dataset(images, cfg.storage_options())
        self.vae = tokenizer_vae(cfg, tokenizer, ctx.device)
        self.resolution = image_resolution(tokenizer, cfg)
        self.views = view_set(cfg.tokenize.augment, self.resolution)
        self.tokenizer, self.cfg, self.device = tokenizer, cfg, ctx.device
        self.num_inputs = len(self.dataset)
        self.split = None  # images carry no split name; the caller passes one
        self.vae_identity = self.vae.identity
        self.description = {"kind": "images", "path": str(images), "image": recipe(self.resolution),
                            "classes": self.dataset.classes}  # class folder names (None for shards)

    def units(self, writer: TokenWriter, units: list[int]):
        """Yield each unit's ids (n, V, T) with labels, keys and skipped inputs, in order."""
        views = self.views
        # tokenize.batch_size counts what the VAE encodes at once: views, so a batch holds that many / V images
        images_per_batch = max(1, self.cfg.tokenize.batch_size // views.num_views)
        return map_units(self.dataset, writer, units, lambda images: _ids_of_views(self.tokenizer, self.vae, views, images),
                         batch_size=images_per_batch, resolution=views.source_resolution,
                         num_workers=self.cfg.tokenize.num_workers, device=self.device,
                         output_shape=(views.num_views, self.tokenizer.num_tokens), output_dtype=np.int64)


def _ids_of_views(tokenizer: RevqTokenizer, vae, views: ViewSet, images) -> np.ndarray:
    """Decoded images (B, 3, S, S) -> ids (B, V, T) of their views."""
    cut = views(images)  # (B, V, 3, R, R)
    ids = tokenizer.latents_to_ids(vae.encode(cut.flatten(0, 1)))  # (B V, T)
    return ids.view(cut.shape[0], views.num_views, -1).cpu().numpy()


class _CacheSource:
    """Cached latents -> ids; a cache has no unreadable inputs."""

    unit = "latent"

    def __init__(self, path: str, tokenizer: RevqTokenizer, cfg: RevqConfig, ctx: DistContext) -> None:
        if cfg.tokenize.augment != "none":
            raise ValueError(f"--augment {cfg.tokenize.augment} needs images (a latent cache cannot be flipped or "
                             "cropped): pass --images PATH, or --augment none with --cache")
        self.cache = LatentCache.open(path, options=cfg.storage_options())
        self.cache.check_matches(tokenizer.vae_identity, tokenizer.latent_shape, what="the tokenizer",
                                 fix="tokenize a cache encoded with the tokenizer's VAE")
        self.labels, self.keys = self.cache.labels(), self.cache.keys()
        self.tokenizer, self.batch_size, self.device = tokenizer, cfg.tokenize.batch_size, ctx.device
        self.num_inputs = self.cache.num_samples
        self.split = self.cache.manifest.split
        self.vae_identity = self.cache.manifest.vae
        self.views = view_set("none", self.cache.manifest.image.get("resolution"))  # None for imported latents
        self.description = {"kind": "cache", "path": str(path), "latent_dtype": self.cache.manifest.latent_dtype,
                            "image": self.cache.manifest.image, "note": CACHE_NOTE}

    def units(self, writer: TokenWriter, units: list[int]):
        for u in units:
            start, stop = writer.unit_range(u)
            ids = [self.tokenizer.latents_to_ids(self.cache.read(b, min(b + self.batch_size, stop)).to(self.device))
                   .cpu().numpy() for b in range(start, stop, self.batch_size)]
            yield UnitOutputs(unit=u, outputs=np.concatenate(ids)[:, None], labels=self.labels[start:stop],
                              keys=self.keys[start:stop], skipped=[])
