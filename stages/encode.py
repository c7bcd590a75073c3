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

`out` may be a URL (s3://bucket/prefix/train.zarr, any fsspec scheme): the store is then written
through fsspec with the options of `storage.storage_options(cfg.storage.endpoint_url)` (credentials
from the standard places), and the config goes beside it as the object
s3://bucket/prefix/train.config.yaml, written by one PUT; never inside the store, so replacing or
deleting the store leaves the record of the command that made it. A URL is never turned into a
local path.
"""

from __future__ import annotations


import numpy as np
from revq_pipe.cache.schema import CacheManifest
from revq_pipe.cache.writer import CacheWriter
from revq_pipe.pipeline.images import recipe
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.config import RevqConfig, save_config_beside
from revq_pipe.stages.console import log, progress
from revq_pipe.stages.datasets import map_units, open_image_dataset
from revq_pipe.stages.distributed import distributed, run_on_main
from revq_pipe.stages.skipped import describe_skipped


def run_encode(cfg: RevqConfig, *, split: str, images: str, out: str, overwrite: bool) -> CacheManifest:
    """Encode `images` with cfg.vae into the latent cache `out`; resumes an unfinished store.

    Run it under torchrun to spread the work over processes / GPUs. Returns the manifest.
    """
    options = cfg.storage_options()
    with distributed(cfg.vae.device, cfg.dist.timeout_minutes) as ctx:
        # ---- setup: data, model, store --------------------------------------------------------
        dataset = open_image_dataset(images, options)
        vae = FrozenVAE.load(cfg.vae.source, device=ctx.device, precision=cfg.vae.precision)
        latent_shape = vae.latent_shape(cfg.data.resolution)  # stops here if R does not fit the VAE
        log(f"encode {split}: {len(dataset)} images from {images} at {cfg.data.resolution}px -> "
            f"{latent_shape} latents with {vae.class_name} {vae.source} on {ctx.device} "
            f"({ctx.world_size} process{'es' if ctx.world_size > 1 else ''})")
        if dataset.ignored:
            log(f"ignored {len(dataset.ignored)} files that are no image Pillow opens (first: "
                f"{', '.join(dataset.ignored[:5])}); they are recorded in the store's 'ignored'")
        writer_args = dict(num_inputs=len(dataset), latent_shape=latent_shape, split=split,
                           vae_identity=vae.identity, image_recipe=recipe(cfg.data.resolution),
                           source=str(images), chunk_size=cfg.encode.chunk_size, latent_dtype=cfg.encode.latent_dtype,
                           options=options)
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
            config_path = save_config_beside(cfg, out, options)
            log(f"resolved config written to {config_path}")
            if writer.num_staged:
                log(f"resuming: {writer.num_staged} of {writer.num_units} units already encoded")

        # ---- encode and stage this rank's pending units ---------------------------------------------
        # what is left is shared out evenly, from one listing (rank 0's)
        units = writer.pending_units(ctx.rank, ctx.world_size, run_on_main(ctx, writer.missing_units, share=True))
        name = f"encode {split}" + (f" (rank 0 of {ctx.world_size})" if ctx.is_distributed else "")
        with progress(sum(len(range(*writer.unit_range(u))) for u in units), name, enabled=ctx.is_main) as bar, \
                ctx.phase("encode the images"):
            for part in map_units(dataset, writer, units, vae.encode,
                                  batch_size=cfg.encode.batch_size, resolution=cfg.data.resolution,
                                  num_workers=cfg.encode.num_workers, device=ctx.device,
                                  output_shape=latent_shape, output_dtype=np.float32):
                writer.write_unit(part.unit, part.outputs, part.labels, part.keys, part.skipped)
                bar.advance(len(part.keys) + len(part.skipped))
            ctx.barrier()

        # ---- finish: every rank assembles its share of the store ----------------------------------
        with ctx.phase("assemble the store"):
            manifest = writer.finalize(ignored=dataset.ignored, collective=ctx)
        log(f"wrote {manifest.num_samples} latents {tuple(manifest.latent_shape)} {manifest.latent_dtype} to {out}")
        skipped = list(zip(manifest.skipped["keys"], manifest.skipped["reasons"]))
        if skipped:
            log(describe_skipped(skipped, what="unreadable images (all are listed in the store's 'skipped')"))
        return manifest
