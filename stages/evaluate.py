"""Evaluate a trained tokenizer the way tokenizers are compared, next to the continuous VAE's own ceiling.

Per batch: images x -> VAE encoder -> z; the VAE alone reconstructs decode(z); the tokenizer
reconstructs decode(ids_to_latents(latents_to_ids(z))). Both are clamped and rounded to 8 bits
before any metric. `--from-cache` evaluates at the latent level on the split's cache instead: no
images, no decoder, image metrics null.

Reports of different scope never overwrite each other: RUN/eval_<split>.json is the whole split
from images; a limited run writes eval_<split>_first<N>.json and a latent-level one
eval_<split>_latents[_first<N>].json. Each report has its grid (<report>_grid.png) and its resolved
config (<report>.config.yaml); each report also has its codebook-usage map (<report>_usage.png, the usage
of every token position painted over the latent layout). The grid's tokenizer and VAE tiles carry their
PSNR against the original, and the report lists them with the images' keys under "grid". Rerunning the
same scope replaces that report and says so.
Run under torchrun to spread the images over processes; statistics are summed across ranks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from revq_pipe.cache.collective import rank_slice
from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.files import atomic_write_text
from revq_pipe.pipeline.metrics import psnr_rgb
from revq_pipe.pipeline.quantizer import CodeUsage
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.pipeline.precision import describe as describe_precision, job_precision
from revq_pipe.stages.config import RevqConfig, save_config
from revq_pipe.stages.console import console, log, progress
from revq_pipe.stages.datasets import contiguous_batches, image_batches, open_image_dataset
from revq_pipe.stages.distributed import DistContext, distributed
from revq_pipe.stages.eval_metrics import (FID_BACKEND, IMAGE_METRICS, INCEPTION_SPLITS, ReconstructionMetrics,
                                           load_metric_networks)
from revq_pipe.stages.grid import write_grid, write_usage_map
from revq_pipe.stages.run_dir import (TOKENIZER_DIR, image_resolution, load_tokenizer, split_location,
                                      tokenizer_identity, tokenizer_vae)
from revq_pipe.stages.skipped import describe_skipped, skipped_record

FROM_CACHE_REASON = "latent-level evaluation (--from-cache)"
PSNR_NOTE = ("psnr is RGB PSNR over all three channels (peak 255), not the reference code's PSNR, which measures "
             "the red channel only; psnr_y is the BT.601 luma PSNR")
GRID_ROWS = ("original", "VAE", "tokenizer")


def report_name(split: str, *, from_cache: bool, limit: int) -> str:
    """The report's file stem for a scope: eval_<split>[_latents][_first<N>]."""
    return f"eval_{split}" + ("_latents" if from_cache else "") + (f"_first{limit}" if limit > 0 else "")


def run_evaluate(cfg: RevqConfig, *, run: str, split: str, images: str | None, from_cache: bool,
                 cache: str | None = None) -> dict:
    """Evaluate RUN/tokenizer on a split; returns the report also written to RUN/<report_name>.json.

    Args:
        images: the split's images (default data.<split>_images).
        from_cache: evaluate at the latent level on `cache` (default data.<split>_cache).
        cache: the latent cache for the latent level; implies from_cache.
    """
    # the tokenizer (search and rectifier) in IEEE float32, whatever the device's default (cuDNN takes TF32)
    with distributed(cfg.vae.device, cfg.dist.timeout_minutes) as ctx, job_precision("fp32"):
        return _evaluate(cfg, Path(run), split, images, from_cache or cache is not None, cache, ctx)


def _evaluate(cfg: RevqConfig, run: Path, split: str, images: str | None, from_cache: bool, cache: str | None,
              ctx: DistContext) -> dict:
    start = time.perf_counter()
    tokenizer = load_tokenizer(run, ctx.device, search_memory_mb=cfg.quantizer.search_memory_mb)
    stem = report_name(split, from_cache=from_cache, limit=cfg.eval.limit)
    if from_cache:
        source = cache or split_location(cfg, split, "cache")
        body = _evaluate_latents(cfg, tokenizer, split, source, run / f"{stem}.config.yaml", ctx)
    else:
        source = images or split_location(cfg, split, "images")
        body = _evaluate_images(cfg, tokenizer, split, source, run / stem, ctx)
    if ctx.is_main:
        usage_map = write_usage_map(run / f"{stem}_usage.png", body["usage_per_position"], tokenizer.latent_shape,
                                    title=f"codebook usage per token position: eval {split}, {body['num_images']} "
                                          f"{'latents' if from_cache else 'images'}, K={tokenizer.codebook_size}")
        log(f"codebook usage per position written to {usage_map}")
    T, K = tokenizer.num_tokens, tokenizer.codebook_size
    report = {
        "split": split,
        "num_images": body["num_images"],
        **{metric: body["tokenizer"][metric] for metric in (*IMAGE_METRICS, "inception_score_std")},
        "latent_mse": body["latent_mse"],
        "latent_mse_quantized": body["latent_mse_quantized"],
        "codebook_usage": body["codebook_usage"],
        "perplexity": body["perplexity"],
        "bits_per_image": T * math.log2(K),
        "vae_ceiling": body["vae_ceiling"],
        "missing": body["missing"],
        "protocol": body["protocol"],
        "tokenizer": {**tokenizer_identity(run / TOKENIZER_DIR), "num_tokens": T, "codebook_size": K,
                      "token_dim": tokenizer.token_dim, "latent_shape": list(tokenizer.latent_shape)},
        "vae": body["vae"],
        "grid": body.get("grid"),
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    if ctx.is_main:
        path = run / f"{stem}.json"
        replaced = path.is_file()
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        _print_summary(report, path, replaced)
    return report


# --- images -> tokens -> images -----------------------------------------------------------------


def _evaluate_images(cfg: RevqConfig, tokenizer: RevqTokenizer, split: str, images: str, stem: Path,
                     ctx: DistContext) -> dict:
    # --- setup: data, VAE, metric networks; then the config, once every input is known good --------
    dataset = open_image_dataset(images, cfg.storage_options())
    resolution = image_resolution(tokenizer, cfg)  # refuses a data.resolution it cannot honour, before the VAE loads
    vae = tokenizer_vae(cfg, tokenizer, ctx.device)
    if vae.latent_shape(resolution) != tokenizer.latent_shape:
        raise ValueError(f"the VAE {vae.source} makes {vae.latent_shape(resolution)} latents at {resolution}px, but "
                         f"the tokenizer expects {tokenizer.latent_shape}; pass the VAE it was trained with")
    nets = load_metric_networks(cfg.eval.fid_weights, cfg.eval.lpips_weights, ctx.device)
    if ctx.is_main:
        save_config(cfg, stem.with_suffix(".config.yaml"))
    for name, reason in nets.missing.items():
        log(f"{name} metrics will be null: {reason}")
    num_inputs = len(dataset) if cfg.eval.limit <= 0 else min(cfg.eval.limit, len(dataset))
    batches = contiguous_batches(*rank_slice(num_inputs, ctx.rank, ctx.world_size), cfg.eval.batch_size)
    log(f"eval {split}: {num_inputs} images from {images} at {resolution}px on {ctx.device} "
        f"({ctx.world_size} process{'es' if ctx.is_distributed else ''}); VAE {vae.source}")

    # --- loop: reconstruct, measure, count -----------------------------------------------------
    metrics = ReconstructionMetrics(["tokenizer", "vae_ceiling"], nets, ctx.device)
    latent_sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # values, quantized SSE, rectified SSE
    usage = CodeUsage(tokenizer.num_tokens, tokenizer.codebook_size, ctx.device)
    grid, skipped = [], []
    with progress(sum(map(len, batches)), f"eval {split}", enabled=ctx.is_main) as bar:
        for batch in image_batches(dataset, batches, resolution, cfg.eval.num_workers, ctx.device):
            skipped += [(dataset.key(i), reason) for i, reason in batch.skipped]
            if batch.images is not None:
                rec = tokenizer.reconstruct(batch.images)
                metrics.update(rec.original, {"tokenizer": rec.tokenizer, "vae_ceiling": rec.vae},
                               torch.tensor(batch.indices))
                latent_sums += rec.latents.squared_errors()
                usage.add(rec.latents.ids)
                if ctx.is_main and len(grid) < cfg.eval.grid_images:
                    keys = [dataset.key(i) for i in batch.indices]
                    grid += list(zip(keys, rec.original.cpu(), rec.vae.cpu(), rec.tokenizer.cpu()))
            bar.advance(len(batch.indices) + len(batch.skipped))

    # --- finish: merge ranks, grid ---------------------------------------------------------------
    metrics.all_reduce_(ctx)
    ctx.all_reduce_sum_(latent_sums)
    ctx.all_reduce_sum_(usage.counts)
    skipped = [item for part in ctx.all_gather_object(skipped) for item in part]
    if ctx.is_main and skipped:
        log(describe_skipped(skipped, what="unreadable images (not evaluated)"))
    grid_record = _write_grid(stem.with_name(stem.name + "_grid.png"), grid[:cfg.eval.grid_images]) \
        if ctx.is_main and grid else None
    tok, tok_missing = metrics.result("tokenizer")
    ceiling, ceiling_missing = metrics.result("vae_ceiling")
    num_images = int(metrics.sums["tokenizer"][0])
    protocol = _protocol(tokenizer, resolution, num_images, skipped, source=images, level="images")
    protocol.update({"fid_weights_sha256": nets.fid_sha256, "lpips_weights_sha256": nets.lpips_sha256,
                     "vae_precision": describe_precision(vae.precision, "the VAE"),
                     "metric_networks_precision": "ieee float32 (no autocast, no TF32)"})
    return {"num_images": num_images, "tokenizer": tok, "vae_ceiling": ceiling, "vae": vae.identity,
            "missing": {**tok_missing, **{f"vae_ceiling.{k}": v for k, v in ceiling_missing.items()}},
            "protocol": protocol, "grid": grid_record, **_latent_report(latent_sums, usage)}


def _write_grid(path: Path, grid: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The labelled grid of (key, original, VAE, tokenizer) images, each reconstruction captioned with its RGB
    PSNR against the original; returns the report's record of it (file and per-image PSNRs)."""
    keys = [key for key, *_ in grid]
    original, vae, tokenizer = (torch.stack([images[k] for images in grid]) for k in (1, 2, 3))
    psnr = {"vae": psnr_rgb(original, vae).tolist(), "tokenizer": psnr_rgb(original, tokenizer).tolist()}
    captions = [None, [f"{v:.1f} dB" for v in psnr["vae"]], [f"{v:.1f} dB" for v in psnr["tokenizer"]]]
    write_grid(path, [original, vae, tokenizer], labels=GRID_ROWS, captions=captions)
    log(f"reconstruction grid (rows: {' | '.join(GRID_ROWS)}, PSNR under each reconstruction) written to {path}")
    return {"file": path.name, "rows": list(GRID_ROWS),
            "images": [{"key": key, "psnr_vae": v, "psnr_tokenizer": t}
                       for key, v, t in zip(keys, psnr["vae"], psnr["tokenizer"])]}


# --- latent level (--from-cache) ---------------------------------------------------------------


def _evaluate_latents(cfg: RevqConfig, tokenizer: RevqTokenizer, split: str, path: str, config_path: Path,
                      ctx: DistContext) -> dict:
    cache = LatentCache.open(path, options=cfg.storage_options())
    cache.check_matches(tokenizer.vae_identity, tokenizer.latent_shape, what="the tokenizer",
                        fix="pass the cache of the split encoded with the tokenizer's VAE (--cache STORE)")
    if tokenizer.image_recipe.get("resolution") is not None:
        image_resolution(tokenizer, cfg)  # the config written below must not record a side it could not honour
    if ctx.is_main:
        save_config(cfg, config_path)
    num_inputs = cache.num_samples if cfg.eval.limit <= 0 else min(cfg.eval.limit, cache.num_samples)
    log(f"eval {split} at the latent level: {num_inputs} latents from {path}")
    latent_sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    usage = CodeUsage(tokenizer.num_tokens, tokenizer.codebook_size, ctx.device)
    batches = contiguous_batches(*rank_slice(num_inputs, ctx.rank, ctx.world_size), cfg.eval.batch_size)
    with progress(sum(map(len, batches)), f"eval {split} (latents)", enabled=ctx.is_main, unit="latent") as bar:
        for rows in batches:
            latents = tokenizer.round_trip(cache.read(rows[0], rows[-1] + 1).to(ctx.device))
            latent_sums += latents.squared_errors()
            usage.add(latents.ids)
            bar.advance(len(rows))
    ctx.all_reduce_sum_(latent_sums)
    ctx.all_reduce_sum_(usage.counts)
    nulls = {metric: None for metric in (*IMAGE_METRICS, "inception_score_std")}
    missing = {m: FROM_CACHE_REASON for m in IMAGE_METRICS}
    missing.update({f"vae_ceiling.{m}": FROM_CACHE_REASON for m in IMAGE_METRICS})
    protocol = _protocol(tokenizer, tokenizer.image_recipe.get("resolution"), num_inputs, [], source=str(path),
                         level="latents (--from-cache): cached latents are stored as " + cache.manifest.latent_dtype)
    protocol.update({"fid_weights_sha256": None, "lpips_weights_sha256": None})
    return {"num_images": num_inputs, "tokenizer": nulls, "vae_ceiling": dict(nulls), "vae": cache.manifest.vae,
            "missing": missing, "protocol": protocol, **_latent_report(latent_sums, usage)}


# --- helpers ------------------------------------------------------------------------------------


def _latent_report(sums: torch.Tensor, usage: CodeUsage) -> dict[str, Any]:
    """Latent MSEs from (values, quantized SSE, rectified SSE) and usage from the code counts."""
    values, quantized, rectified = sums.tolist()
    summary = usage.summary()
    return {"latent_mse": rectified / values if values else None,
            "latent_mse_quantized": quantized / values if values else None,
            "codebook_usage": summary["codebook_usage"], "perplexity": summary["perplexity"],
            "usage_per_position": (usage.counts > 0).double().mean(dim=1).cpu()}  # (T,), for the usage map


def _protocol(tokenizer: RevqTokenizer, resolution: int | None, num_images: int, skipped: list[tuple[str, str]],
              *, source: str, level: str) -> dict[str, Any]:
    return {
        "level": level,
        "source": source,
        "image": tokenizer.image_recipe,
        "resolution": resolution,
        "fid_backend": FID_BACKEND,
        "fid_reference": "the evaluated originals, 8-bit, same recipe",
        "inception_score_splits": INCEPTION_SPLITS,
        "lpips_backend": "LPIPS v0.1, AlexNet",
        "ssim": "BT.601 luma, 11x11 Gaussian window, sigma 1.5",
        "rounding": "clamp [0,1], round to 8 bit",
        "psnr_note": PSNR_NOTE,
        "latent_mse_note": ("mean squared error in the standardized latent space (the tokenizer's normalizer): "
                            "latent_mse after the rectifier, latent_mse_quantized before it"),
        "codebook_usage_note": ("codebook_usage: fraction of codes chosen at least once over the evaluated set, "
                                "averaged over positions; perplexity: exp(entropy) of the code distribution, "
                                "averaged over positions"),
        "tokenizer_precision": "ieee float32 (no autocast, no TF32)",
        "num_images": num_images,
        "skipped": skipped_record(skipped),
    }


def _print_summary(report: dict, path: Path, replaced: bool) -> None:
    """A short table on the console; the whole report is in the file."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    table = Table(title=f"eval {report['split']}: {report['num_images']} images ({report['protocol']['level']})")
    for column in ("", "rFID", "IS", "PSNR", "PSNR-Y", "SSIM", "LPIPS"):
        table.add_column(column, justify="left" if not column else "right")
    for name, scope in (("tokenizer", report), ("VAE ceiling", report["vae_ceiling"])):
        table.add_row(name, fmt(scope["rfid"], ".3f"), fmt(scope["inception_score"], ".2f"), fmt(scope["psnr"], ".2f"),
                      fmt(scope["psnr_y"], ".2f"), fmt(scope["ssim"], ".4f"), fmt(scope["lpips"], ".4f"))
    console.print(table)
    log(f"latent MSE {fmt(report['latent_mse'], '.4f')} (quantized {fmt(report['latent_mse_quantized'], '.4f')}) | "
        f"usage {fmt(report['codebook_usage'], '.1%')} perplexity {fmt(report['perplexity'], '.1f')} | "
        f"{report['bits_per_image']:.0f} bits/image")
    reasons = sorted(set(report["missing"].values()))
    for reason in reasons:  # each reason once, however many metrics it nulls
        metrics = [m for m, r in report["missing"].items() if r == reason and not m.startswith("vae_ceiling.")]
        log(f"null ({', '.join(metrics) or 'VAE ceiling'}): {reason}")
    log(f"report {'replaced at' if replaced else 'written to'} {path}")
