"""Evaluate a trained tokenizer the way tokenizers are compared, next to the continuous VAE's own ceiling.

Per batch: images x -> VAE encoder -> z; the VAE alone reconstructs decode(z); the tokenizer
reconstructs decode(ids_to_latents(latents_to_ids(z))). Both are clamped and rounded to 8 bits
before any metric. Writes RUN/eval_<split>.json (and RUN/eval_<split>_grid.png); the resolved
config goes to RUN/eval_<split>.config.yaml before work starts. `--from-cache` evaluates at the
latent level on the split's cache instead: no images, no decoder, image metrics null.
Run under torchrun to spread the images over processes; statistics are summed across ranks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zarr

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.pipeline.quantizer import codebook_usage, count_ids, perplexity
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig, save_config
from revq_pipe.stages.console import log, progress
from revq_pipe.stages.datasets import open_image_dataset
from revq_pipe.stages.distributed import DistContext, init_distributed, shutdown_distributed
from revq_pipe.stages.eval_common import (add_latent_errors, image_batches, load_matching_vae, load_tokenizer,
                                rank_batches, reconstruct, resolution_of, tokenize_latents, tokenizer_identity)
from revq_pipe.stages.eval_metrics import (FID_BACKEND, IMAGE_METRICS, INCEPTION_SPLITS, ReconstructionMetrics,
                                 load_metric_networks)
from revq_pipe.stages.grid import write_grid

FROM_CACHE_REASON = "latent-level evaluation (--from-cache)"
PSNR_NOTE = ("psnr is RGB PSNR over all three channels (peak 255), not the reference code's PSNR, which measures "
             "the red channel only; psnr_y is the BT.601 luma PSNR")


def run_evaluate(cfg: RevqConfig, *, run: str, split: str, images: str | None, from_cache: bool) -> dict:
    """Evaluate RUN/tokenizer on a split; returns the report also written to RUN/eval_<split>.json."""
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(cfg.vae.device)
    try:
        return _evaluate(cfg, Path(run), split, images, from_cache, ctx)
    finally:
        if owns_process_group:
            shutdown_distributed(ctx)


def _evaluate(cfg: RevqConfig, run: Path, split: str, images: str | None, from_cache: bool,
              ctx: DistContext) -> dict:
    start = time.perf_counter()
    tokenizer = load_tokenizer(run, ctx.device)
    if ctx.is_main:
        save_config(cfg, run / f"eval_{split}.config.yaml")
    if from_cache:
        body = _evaluate_latents(cfg, tokenizer, split, ctx)
    else:
        body = _evaluate_images(cfg, tokenizer, run, split, images or _configured(cfg, split, "images"), ctx)
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
        "tokenizer": {**tokenizer_identity(run), "num_tokens": T, "codebook_size": K,
                      "token_dim": tokenizer.token_dim, "latent_shape": list(tokenizer.latent_shape)},
        "vae": body["vae"],
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    if ctx.is_main:
        path = run / f"eval_{split}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
        _log_summary(report, path)
    return report


# --- images -> tokens -> images -----------------------------------------------------------------


def _evaluate_images(cfg: RevqConfig, tokenizer: RevqTokenizer, run: Path, split: str, images: str,
                     ctx: DistContext) -> dict:
    # --- setup: data, VAE, metric networks ----------------------------------------------------
    dataset = open_image_dataset(images)
    vae = load_matching_vae(cfg, tokenizer, ctx.device)
    resolution = resolution_of(tokenizer, cfg)
    if vae.latent_shape(resolution) != tokenizer.latent_shape:
        raise ValueError(f"the VAE {vae.source} makes {vae.latent_shape(resolution)} latents at {resolution}px, but "
                         f"the tokenizer expects {tokenizer.latent_shape}; pass the VAE it was trained with")
    nets = load_metric_networks(cfg.eval.fid_weights, cfg.eval.lpips_weights, ctx.device)
    for name, reason in nets.missing.items():
        log(f"{name} metrics will be null: {reason}")
    num_inputs = len(dataset) if cfg.eval.limit <= 0 else min(cfg.eval.limit, len(dataset))
    batches = rank_batches(num_inputs, cfg.eval.batch_size, ctx)
    log(f"eval {split}: {num_inputs} images from {images} at {resolution}px on {ctx.device} "
        f"({ctx.world_size} process{'es' if ctx.is_distributed else ''})")

    # --- loop: reconstruct, measure, count -----------------------------------------------------
    metrics = ReconstructionMetrics(["tokenizer", "vae_ceiling"], nets, ctx.device)
    latent_sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # values, quantized SSE, rectified SSE
    usage = torch.zeros(tokenizer.num_tokens, tokenizer.codebook_size, dtype=torch.int64, device=ctx.device)  # (T, K)
    grid, skipped = [], []
    with progress(sum(map(len, batches)), f"eval {split}", enabled=ctx.is_main) as bar:
        for batch in image_batches(dataset, batches, resolution, cfg.encode.num_workers, ctx.device):
            skipped += [(dataset.key(i), reason) for i, reason in batch.skipped]
            if batch.images is not None:
                rec = reconstruct(tokenizer, vae, batch.images)
                metrics.update(rec.original, {"tokenizer": rec.tokenizer, "vae_ceiling": rec.vae},
                               torch.tensor(batch.indices))
                add_latent_errors(latent_sums, rec.tokens)
                usage += count_ids(rec.tokens.ids, tokenizer.codebook_size)
                if ctx.is_main and len(grid) < cfg.eval.grid_images:
                    grid += list(zip(rec.original.cpu(), rec.vae.cpu(), rec.tokenizer.cpu()))
            bar.advance(len(batch.indices) + len(batch.skipped))

    # --- finish: merge ranks, grid ---------------------------------------------------------------
    metrics.all_reduce_(ctx)
    ctx.all_reduce_sum_(latent_sums)
    ctx.all_reduce_sum_(usage)
    skipped = [item for part in ctx.all_gather_object(skipped) for item in part]
    if ctx.is_main and grid:
        rows = [torch.stack([images[k] for images in grid[:cfg.eval.grid_images]]) for k in range(3)]
        log(f"reconstruction grid (original | VAE | tokenizer) written to "
            f"{write_grid(run / f'eval_{split}_grid.png', rows)}")
    tok, tok_missing = metrics.result("tokenizer")
    ceiling, ceiling_missing = metrics.result("vae_ceiling")
    num_images = int(metrics.sums["tokenizer"][0])
    protocol = _protocol(tokenizer, resolution, num_images, skipped, source=images, level="images")
    protocol.update({"fid_weights_sha256": nets.fid_sha256, "lpips_weights_sha256": nets.lpips_sha256})
    return {"num_images": num_images, "tokenizer": tok, "vae_ceiling": ceiling, "vae": vae.identity,
            "missing": {**tok_missing, **{f"vae_ceiling.{k}": v for k, v in ceiling_missing.items()}},
            "protocol": protocol, **_latent_report(latent_sums, usage)}


# --- latent level (--from-cache) ---------------------------------------------------------------


def _evaluate_latents(cfg: RevqConfig, tokenizer: RevqTokenizer, split: str, ctx: DistContext) -> dict:
    path = _configured(cfg, split, "cache")
    cache = LatentCache.open(path)
    if tuple(cache.latent_shape) != tokenizer.latent_shape:
        raise CacheError(f"{path} holds {tuple(cache.latent_shape)} latents but the tokenizer expects "
                         f"{tokenizer.latent_shape}; pass the cache of the split encoded with the tokenizer's VAE")
    expected, found = tokenizer.vae_identity.get("weights_sha256"), cache.manifest.vae.get("weights_sha256")
    if expected and found and expected != found:
        raise CacheError(f"{path} was encoded by VAE {cache.manifest.vae.get('source')} (sha256 {found[:16]}...) but "
                         f"the tokenizer was trained on {tokenizer.vae_identity.get('source')} latents "
                         f"(sha256 {expected[:16]}...); encode the split with that VAE")
    num_inputs = cache.num_samples if cfg.eval.limit <= 0 else min(cfg.eval.limit, cache.num_samples)
    latents = zarr.open_group(cache.path, mode="r")["latents"]  # (N, C, H, W), read a batch at a time
    log(f"eval {split} at the latent level: {num_inputs} latents from {path}")
    latent_sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    usage = torch.zeros(tokenizer.num_tokens, tokenizer.codebook_size, dtype=torch.int64, device=ctx.device)  # (T, K)
    batches = rank_batches(num_inputs, cfg.eval.batch_size, ctx)
    with progress(sum(map(len, batches)), f"eval {split} (latents)", enabled=ctx.is_main, unit="latent") as bar:
        for rows in batches:
            z = torch.from_numpy(np.asarray(latents[rows[0]:rows[-1] + 1], dtype=np.float32))
            tokens = tokenize_latents(tokenizer, z.to(ctx.device))
            add_latent_errors(latent_sums, tokens)
            usage += count_ids(tokens.ids, tokenizer.codebook_size)
            bar.advance(len(rows))
    ctx.all_reduce_sum_(latent_sums)
    ctx.all_reduce_sum_(usage)
    nulls = {metric: None for metric in (*IMAGE_METRICS, "inception_score_std")}
    missing = {m: FROM_CACHE_REASON for m in IMAGE_METRICS}
    missing.update({f"vae_ceiling.{m}": FROM_CACHE_REASON for m in IMAGE_METRICS})
    protocol = _protocol(tokenizer, tokenizer.image_recipe.get("resolution"), num_inputs, [], source=str(path),
                         level="latents (--from-cache): cached latents are stored as " + cache.manifest.latent_dtype)
    protocol.update({"fid_weights_sha256": None, "lpips_weights_sha256": None})
    return {"num_images": num_inputs, "tokenizer": nulls, "vae_ceiling": dict(nulls), "vae": cache.manifest.vae,
            "missing": missing, "protocol": protocol, **_latent_report(latent_sums, usage)}


# --- helpers ------------------------------------------------------------------------------------


def _configured(cfg: RevqConfig, split: str, kind: str) -> str:
    """cfg.data.<split>_images or <split>_cache; other splits must be passed explicitly."""
    value = getattr(cfg.data, f"{split}_{kind}", None)
    if not value:
        flag = "--images" if kind == "images" else f"--set data.{split}_cache=STORE"
        raise ValueError(f"split {split!r} has no configured {kind} (data.train_{kind} / data.val_{kind}); pass {flag}")
    return value


def _latent_report(sums: torch.Tensor, usage: torch.Tensor) -> dict[str, Any]:
    """Latent MSEs from (values, quantized SSE, rectified SSE) and usage from the (T, K) code counts."""
    values, quantized, rectified = sums.tolist()
    seen = int(usage.sum()) > 0
    return {"latent_mse": rectified / values if values else None,
            "latent_mse_quantized": quantized / values if values else None,
            "codebook_usage": codebook_usage(usage) if seen else None,
            "perplexity": perplexity(usage) if seen else None}


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
        "num_images": num_images,
        "skipped": {"count": len(skipped), "keys": [k for k, _ in skipped], "reasons": [r for _, r in skipped]},
    }


def _log_summary(report: dict, path: Path) -> None:
    def fmt(value, spec):
        return "null" if value is None else format(value, spec)

    ceiling = report["vae_ceiling"]
    log(f"eval {report['split']}: {report['num_images']} images | tokenizer rFID {fmt(report['rfid'], '.3f')} "
        f"PSNR {fmt(report['psnr'], '.2f')} SSIM {fmt(report['ssim'], '.3f')} LPIPS {fmt(report['lpips'], '.3f')} | "
        f"VAE ceiling rFID {fmt(ceiling['rfid'], '.3f')} PSNR {fmt(ceiling['psnr'], '.2f')} | latent MSE "
        f"{fmt(report['latent_mse'], '.4f')} (quantized {fmt(report['latent_mse_quantized'], '.4f')}) | usage "
        f"{fmt(report['codebook_usage'], '.1%')} perplexity {fmt(report['perplexity'], '.1f')} | "
        f"{report['bits_per_image']:.0f} bits/image")
    if any(report["missing"].get(m) for m in ("rfid", "lpips")) and "--from-cache" not in str(report["missing"]):
        log("to compute rFID / Inception Score / LPIPS, pass --fid-weights FILE and --lpips-weights FILE "
            "(or set REVQ_FID_WEIGHTS / REVQ_LPIPS_WEIGHTS); the reasons are in the report's 'missing'")
    log(f"report written to {path}")
