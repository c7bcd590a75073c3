"""How much latent noise does the frozen decoder tolerate, and where does the tokenizer sit on that curve?

For the first tolerance.limit images: clean latent z, clean reconstruction x0 = decode(z). For each
sigma in tolerance.sigmas: z' = normalize(z) + N(0, sigma^2) in the standardized space, decoded after
de-standardizing, and compared with x0 (both 8-bit): PSNR, SSIM (and rFID / LPIPS when their weights
are given). The tokenizer's quantized-only and rectified latents go on the same axes at their
effective sigma, the RMS of their error in the standardized space. The noise is one seeded draw
(tolerance.seed) shared by every sigma, so the curve is smooth and the numbers reproducible. rFID and
LPIPS use the evaluation's metric networks (eval.fid_weights, eval.lpips_weights).
Writes RUN/tolerance.json and RUN/tolerance.png (resolved config: RUN/tolerance.config.yaml).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from revq_pipe.cache.collective import rank_slice
from revq_pipe.pipeline.files import atomic_path, atomic_write_text
from revq_pipe.pipeline.images import to_uint8
from revq_pipe.pipeline.precision import job_precision
from revq_pipe.stages.config import RevqConfig, save_config
from revq_pipe.stages.console import log, progress
from revq_pipe.stages.datasets import contiguous_batches, image_batches, open_image_dataset
from revq_pipe.stages.distributed import DistContext, distributed
from revq_pipe.stages.eval_metrics import FID_BACKEND, ReconstructionMetrics, load_metric_networks
from revq_pipe.stages.run_dir import TOKENIZER_DIR, image_resolution, load_tokenizer, tokenizer_identity, tokenizer_vae

TOKENIZER_POINTS = ("quantized", "rectified")
TOLERANCE_METRICS = ("psnr", "ssim", "rfid", "lpips")


def run_tolerance(cfg: RevqConfig, *, run: str, images: str) -> Path:
    """Measure the decoder's latent-noise tolerance with the tokenizer on the curve; returns RUN/tolerance.json."""
    with distributed(cfg.vae.device, cfg.dist.timeout_minutes) as ctx, job_precision("fp32"):  # as eval
        return _tolerance(cfg, Path(run), images, ctx)


def _label(sigma: float) -> str:
    return f"sigma={sigma:g}"


def _tolerance(cfg: RevqConfig, run: Path, images: str, ctx: DistContext) -> Path:
    start = time.perf_counter()
    sigmas = [float(s) for s in cfg.tolerance.sigmas]
    if not sigmas or min(sigmas) < 0:
        raise ValueError(f"tolerance.sigmas={sigmas} must be a non-empty list of non-negative numbers")
    # --- setup: tokenizer, VAE, data, noise ---------------------------------------------------------
    tokenizer = load_tokenizer(run, ctx.device, search_memory_mb=cfg.quantizer.search_memory_mb)
    resolution = image_resolution(tokenizer, cfg)  # refuses a data.resolution it cannot honour, before the VAE loads
    vae = tokenizer_vae(cfg, tokenizer, ctx.device)
    dataset = open_image_dataset(images, cfg.storage_options())
    num_inputs = len(dataset) if cfg.tolerance.limit <= 0 else min(cfg.tolerance.limit, len(dataset))
    nets = load_metric_networks(cfg.eval.fid_weights, cfg.eval.lpips_weights, ctx.device)
    if ctx.is_main:
        save_config(cfg, run / "tolerance.config.yaml")
    # one draw for all sigmas and ranks: row i belongs to image i whatever the world size
    noise = torch.randn((num_inputs, *tokenizer.latent_shape),
                        generator=torch.Generator().manual_seed(cfg.tolerance.seed))
    log(f"tolerance: {num_inputs} images from {images}, sigmas {sigmas}")

    # --- loop: clean, noisy and tokenizer reconstructions vs the clean one ------------------------------
    sources = [_label(s) for s in sigmas] + list(TOKENIZER_POINTS)
    metrics = ReconstructionMetrics(sources, nets, ctx.device)
    errors = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # values, quantized SSE, rectified SSE
    batches = contiguous_batches(*rank_slice(num_inputs, ctx.rank, ctx.world_size), cfg.tolerance.batch_size)
    with progress(sum(map(len, batches)), "tolerance", enabled=ctx.is_main) as bar:
        for batch in image_batches(dataset, batches, resolution, cfg.tolerance.num_workers, ctx.device):
            if batch.images is not None:
                with torch.no_grad():
                    rec = tokenizer.reconstruct(batch.images)  # clean x0 = rec.vae, rectified = rec.tokenizer
                    latents, eps = rec.latents, noise[batch.indices].to(ctx.device)
                    decoded = {_label(s): to_uint8(vae.decode(tokenizer.destandardize(latents.clean + s * eps)))
                               for s in sigmas}
                    decoded["quantized"] = to_uint8(vae.decode(tokenizer.destandardize(latents.quantized)))
                    decoded["rectified"] = rec.tokenizer
                metrics.update(rec.vae, decoded, torch.tensor(batch.indices))
                errors += latents.squared_errors()
            bar.advance(len(batch.indices) + len(batch.skipped))

    # --- finish: merge ranks, JSON, figure -----------------------------------------------------------
    metrics.all_reduce_(ctx)
    ctx.all_reduce_sum_(errors)
    report = _report(metrics, errors, sigmas, nets, tokenizer, vae, run, num_inputs, cfg.tolerance.seed)
    report["elapsed_s"] = round(time.perf_counter() - start, 3)
    path = run / "tolerance.json"
    if ctx.is_main:
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        figure = plot_tolerance(report, run / "tolerance.png")
        log(f"tolerance written to {path} and {figure}")
    return path


def _report(metrics, errors, sigmas, nets, tokenizer, vae, run, num_inputs, seed) -> dict:
    values, quantized_sse, rectified_sse = errors.tolist()
    effective = {"quantized": math.sqrt(quantized_sse / values) if values else None,
                 "rectified": math.sqrt(rectified_sse / values) if values else None}
    curve, points, missing = [], {}, {}
    for label, sigma in [(_label(s), s) for s in sigmas] + [(name, None) for name in TOKENIZER_POINTS]:
        result, why = metrics.result(label)
        values = {k: result[k] for k in TOLERANCE_METRICS}
        if sigma is None:
            points[label] = {"sigma_effective": effective[label], **values}
        else:
            curve.append({"sigma": sigma, **values})
        for metric, reason in why.items():  # a missing network is said once, other reasons per point
            if metric in TOLERANCE_METRICS:
                missing[metric if reason in nets.missing.values() else f"{label}.{metric}"] = reason
    return {
        "num_images": int(metrics.sums[_label(sigmas[0])][0]),
        "curve": curve,
        "tokenizer_points": points,
        "missing": missing,
        "protocol": {
            "reference": "the clean VAE reconstruction decode(z), 8-bit",
            "noise": f"N(0, sigma^2) per element of the standardized latent (z - mean) / std, one draw (seed {seed}) "
                     "shared by all sigmas, de-standardized before decoding",
            "sigma_effective": "RMS of the tokenizer latent's error vs the clean latent, in the standardized space",
            "rounding": "clamp [0,1], round to 8 bit",
            "psnr": "RGB PSNR (peak 255) against the clean reconstruction",
            "ssim": "BT.601 luma, 11x11 Gaussian window, sigma 1.5",
            "fid_backend": FID_BACKEND, "fid_weights_sha256": nets.fid_sha256,
            "fid_reference": "clean VAE reconstructions of the same images",
            "image": tokenizer.image_recipe,
            "num_images_requested": num_inputs,
        },
        "tokenizer": tokenizer_identity(run / TOKENIZER_DIR),
        "vae": vae.identity,
    }


def plot_tolerance(report: dict, path: Path) -> Path:
    """PSNR and SSIM vs sigma, with the tokenizer's quantized and rectified latents marked."""
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    axes = fig.subplots(1, 2)
    for ax, metric, unit in ((axes[0], "psnr", "PSNR vs clean reconstruction (dB)"), (axes[1], "ssim", "SSIM")):
        curve = [(p["sigma"], p[metric]) for p in report["curve"] if p[metric] is not None]
        if curve:
            ax.plot(*zip(*curve), "o-", color="tab:blue", label="Gaussian latent noise")
        for name, marker, color in (("quantized", "s", "tab:red"), ("rectified", "*", "tab:green")):
            point = report["tokenizer_points"][name]
            if point["sigma_effective"] is not None and point[metric] is not None:
                ax.plot(point["sigma_effective"], point[metric], marker, color=color, markersize=10,
                        label=f"tokenizer {name} (sigma {point['sigma_effective']:.3f})")
        ax.set_xlabel("sigma (standardized latent units)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Decoder tolerance to latent noise ({report['num_images']} images)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path
