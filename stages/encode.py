"""Stage one: run the frozen VAE encoder once over an image dataset into a latent cache.

The inputs are cut into the cache writer's fixed work units (`encode.chunk_size` consecutive
indices); rank r encodes the unstaged units u with u % world_size == r. Inside a unit the VAE
sees fixed batches [start, start + B), [start + B, start + 2B), ... that never cross the unit's
end, so every latent comes out of the same batch whatever the world size and however often the
run was killed and resumed; the store's bytes are therefore identical in all these cases (on the
same hardware and thread settings). Unreadable images are skipped, recorded in the store and
listed at the end.

The resolved config is written next to the store as <store>.config.yaml (e.g.
cache/train.config.yaml for cache/train.zarr), once the store is opened and before encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from revq_pipe.cache.schema import CacheManifest
from revq_pipe.cache.writer import CacheWriter
from revq_pipe.pipeline.images import recipe
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.config import RevqConfig, save_config
from revq_pipe.stages.console import log, progress
from revq_pipe.stages.datasets import DecodedImages, ImageDataset, collate_decoded, open_image_dataset
from revq_pipe.stages.distributed import DistContext, init_distributed, run_on_main, shutdown_distributed

_SKIPPED_LISTED = 20  # skipped keys printed at the end; the store records all of them


def run_encode(cfg: RevqConfig, *, split: str, images: str, out: str, overwrite: bool) -> CacheManifest:
    """Encode `images` with cfg.vae into the latent cache `out`; resumes an unfinished store.

    Run it under torchrun to spread the work over processes / GPUs. Returns the manifest.
    """
    ctx = init_distributed(cfg.vae.device)
    try:
        # ---- setup: data, model, store --------------------------------------------------------
        dataset = open_image_dataset(images)
        vae = FrozenVAE.load(cfg.vae.source, device=ctx.device, autocast_bf16=cfg.vae.autocast_bf16)
        latent_shape = vae.latent_shape(cfg.data.resolution)  # stops here if R does not fit the VAE
        log(f"encode {split}: {len(dataset)} images from {images} at {cfg.data.resolution}px -> "
            f"{latent_shape} latents with {vae.class_name} {vae.source} on {ctx.device} "
            f"({ctx.world_size} process{'es' if ctx.world_size > 1 else ''})")
        writer_args = dict(num_inputs=len(dataset), latent_shape=latent_shape, split=split,
                           vae_identity=vae.identity, image_recipe=recipe(cfg.data.resolution),
                           chunk_size=cfg.encode.chunk_size, latent_dtype=cfg.encode.latent_dtype)
        finished = None if overwrite else CacheWriter.completed(out, **writer_args)
        if finished is not None:
            log(f"{out} already holds this complete {split!r} cache ({finished.num_samples} latents); "
                "nothing to do (pass --overwrite to encode again)")
            return finished
        # rank 0 creates (or resumes) the store, then the other ranks attach to it
        writer = run_on_main(ctx, lambda: CacheWriter.open(out, overwrite=overwrite, create=True, **writer_args))
        if not ctx.is_main:
            writer = CacheWriter.open(out, overwrite=overwrite, create=False, **writer_args)
        else:
            config_path = save_config(cfg, Path(out).with_suffix(".config.yaml"))
            log(f"resolved config written to {config_path}")
            if writer.num_staged:
                log(f"resuming: {writer.num_staged} of {writer.num_units} units already encoded")

        # ---- encode this rank's pending units ---------------------------------------------------
        units = writer.pending_units(ctx.rank, ctx.world_size)
        _encode_units(cfg, dataset, vae, writer, units, split, ctx)
        ctx.barrier()

        # ---- finish: assemble the store on rank 0 ---------------------------------------------
        manifest = run_on_main(ctx, writer.finalize, share=True)
        _log_summary(manifest, out)
        return manifest
    finally:
        shutdown_distributed(ctx)


def _unit_batches(writer: CacheWriter, units: list[int], batch_size: int) -> list[list[int]]:
    """Fixed batches per unit, starting at the unit's start and never crossing its end."""
    batches = []
    for u in units:
        start, stop = writer.unit_range(u)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


def _encode_units(cfg: RevqConfig, dataset: ImageDataset, vae: FrozenVAE, writer: CacheWriter,
                  units: list[int], split: str, ctx: DistContext) -> None:
    """Encode and stage every unit in `units`; one DataLoader feeds all of them in order."""
    batches = _unit_batches(writer, units, cfg.encode.batch_size)
    if not batches:
        return
    loader = DataLoader(
        DecodedImages(dataset, cfg.data.resolution), batch_sampler=batches, collate_fn=collate_decoded,
        num_workers=cfg.encode.num_workers, pin_memory=ctx.device.type == "cuda",
        prefetch_factor=4 if cfg.encode.num_workers > 0 else None,
    )
    total = sum(len(b) for b in batches)
    name = f"encode {split}" + (f" (rank 0 of {ctx.world_size})" if ctx.is_distributed else "")
    pending = iter(units)
    unit = next(pending, None)
    latents, indices, skipped = [], [], []
    with progress(total, name, enabled=ctx.is_main) as bar:
        for batch in loader:
            if batch["images"] is not None:
                latents.append(vae.encode(batch["images"]).cpu().numpy())  # (n, C, H, W) float32
                indices += batch["indices"]
            skipped += batch["skipped"]
            bar.advance(len(batch["indices"]) + len(batch["skipped"]))
            start, stop = writer.unit_range(unit)
            if len(indices) + len(skipped) == stop - start:  # the unit's last batch has arrived
                _write_unit(writer, unit, dataset, latents, indices, skipped)
                latents, indices, skipped = [], [], []
                unit = next(pending, None)


def _write_unit(writer: CacheWriter, unit: int, dataset: ImageDataset, latents: list[np.ndarray],
                indices: list[int], skipped: list[tuple[int, str]]) -> None:
    shape = (0, *writer.manifest.latent_shape)
    writer.write_unit(
        unit,
        np.concatenate(latents) if latents else np.zeros(shape, np.float32),
        np.asarray([dataset.label(i) for i in indices], dtype=np.int64),
        [dataset.key(i) for i in indices],
        [(dataset.key(i), reason) for i, reason in skipped],
    )


def _log_summary(manifest: CacheManifest, out: str) -> None:
    skipped = manifest.skipped
    log(f"wrote {manifest.num_samples} latents {tuple(manifest.latent_shape)} {manifest.latent_dtype} to {out}")
    if skipped["count"]:
        listed = [f"{k} ({r})" for k, r in zip(skipped["keys"], skipped["reasons"])][:_SKIPPED_LISTED]
        more = skipped["count"] - len(listed)
        log(f"skipped {skipped['count']} unreadable images: " + "; ".join(listed)
            + (f"; and {more} more (all are listed in the store's 'skipped' attribute)" if more else ""))
