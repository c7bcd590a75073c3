"""Stage two: train the multi-group quantizer and the rectifier on cached latents.

Reads top to bottom: setup (caches, checks, run directory), data, model, the epoch loop
(train, validate, usage + non-activation reset, metrics line, checkpoint), finish (tokenizer/).
Resume is automatic: a run directory holding a checkpoint of the same config continues from
its last finished epoch and reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer, codebook_usage, perplexity
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.checkpoint import (CHECKPOINT_NAME, METRICS_NAME, append_metrics, prepare_run_dir, rng_state,
                               save_checkpoint, set_rng_state)
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext, init_distributed, shutdown_distributed
from revq_pipe.stages.train_loop import (INIT_STREAM, RESET_STREAM, LatentSource, TrainParts, build_optimizer,
                               derived_generator, lr_factor, train_epoch, validate)

TOKENIZER_DIR = "tokenizer"
_INIT_CANDIDATES_PER_CODE = 2  # the codebook init draws from min(N, 2K) training latents


def run_train(cfg: RevqConfig) -> Path:
    """Train on cfg.data.train_cache (validating on cfg.data.val_cache) into cfg.train.run; returns it."""
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(cfg.train.device)
    try:
        return _train(cfg, ctx)
    finally:
        if owns_process_group:
            shutdown_distributed(ctx)


def _train(cfg: RevqConfig, ctx: DistContext) -> Path:
    tc, qc = cfg.train, cfg.quantizer
    # --- setup: caches, shape checks, run directory ------------------------------------------
    train_cache = LatentCache.open(cfg.data.train_cache)  # refuses an incomplete cache
    val_cache = LatentCache.open(cfg.data.val_cache)
    train_cache.check_compatible(val_cache)
    latent_shape = tuple(train_cache.latent_shape)
    _check_sizes(cfg, latent_shape, train_cache)
    run = Path(tc.run)
    checkpoint = prepare_run_dir(cfg, ctx)  # writes config.yaml; refuses another config's checkpoint
    torch.manual_seed(tc.seed)
    device = ctx.device

    # --- data ---------------------------------------------------------------------------------
    train_data = LatentSource(train_cache, device, tc.data_on_device)
    val_data = LatentSource(val_cache, device, tc.data_on_device)
    steps_per_epoch = train_data.steps_per_epoch(tc.batch_size, ctx.world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={tc.batch_size} x {ctx.world_size} rank(s) is more than the "
                         f"{train_data.num_samples} training latents; lower train.batch_size")
    log(f"train data: {train_data.describe()}")
    log(f"val data:   {val_data.describe()}")
    normalizer = LatentNormalizer(train_cache.mean, train_cache.std).to(device)

    # --- model --------------------------------------------------------------------------------
    quantizer = MultiGroupQuantizer(latent_shape, qc.num_tokens, qc.codebook_size,
                                    search_memory_mb=qc.search_memory_mb).to(device)
    rectifier = build_rectifier(cfg.rectifier, latent_shape[0]).to(device)
    rect_params = [p for p in rectifier.parameters() if p.requires_grad]
    if checkpoint is None:
        _init_codebooks(quantizer, normalizer, train_data, cfg, ctx)
    rectify = rectifier
    if ctx.is_distributed and rect_params:
        rectify = torch.nn.parallel.DistributedDataParallel(
            rectifier, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile and rect_params:
        rectify = torch.compile(rectify)

    optimizer = build_optimizer(quantizer.codebooks, rect_params, codebook_lr=tc.codebook_lr,
                                codebook_weight_decay=tc.codebook_weight_decay, rectifier_lr=tc.rectifier_lr,
                                rectifier_weight_decay=tc.rectifier_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, tc.epochs, tc.final_lr_fraction))
    parts = TrainParts(normalizer=normalizer, quantizer=quantizer, rectifier=rectifier, rectify=rectify,
                       optimizer=optimizer, train_rectifier=bool(rect_params), grad_clip=tc.grad_clip,
                       bf16=tc.bf16 and device.type == "cuda")
    start_epoch, step, elapsed = 0, 0, 0.0
    if checkpoint is not None:
        quantizer.load_state_dict(checkpoint["quantizer"])
        rectifier.load_state_dict(checkpoint["rectifier"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        start_epoch, step, elapsed = checkpoint["epoch"], checkpoint["step"], checkpoint["elapsed_s"]
        log(f"resuming {run} after epoch {start_epoch} (step {step})")
    log(f"model: T={qc.num_tokens} tokens of d={quantizer.token_dim}, K={qc.codebook_size} codes per position "
        f"({quantizer.codebooks.numel():,} codebook params), rectifier {cfg.rectifier.kind} "
        f"{sum(p.numel() for p in rect_params):,} params; {steps_per_epoch} steps/epoch x {ctx.world_size} "
        f"rank(s), batch {tc.batch_size} per rank, device {device}")

    # --- loop: one epoch = train, validate, usage and reset, metrics line, checkpoint -----------
    for epoch in range(start_epoch, tc.epochs):
        epoch_start = time.perf_counter()
        lrs = [group["lr"] for group in optimizer.param_groups]
        prefix = f"epoch {epoch + 1}/{tc.epochs}"
        batches = train_data.epoch_batches(tc.batch_size, seed=tc.seed, epoch=epoch, ctx=ctx)
        stats = train_epoch(parts, batches, epoch=epoch, step=step, ctx=ctx, log_every=tc.log_every,
                            log_prefix=prefix)
        step = stats["step"]
        val = validate(parts, val_data, tc.batch_size, ctx)
        counts = ctx.all_reduce_sum_(parts.counts)  # (T, K) uses over the epoch on all ranks
        usage = {"codebook_usage": float(codebook_usage(counts)), "dead_codes": int((counts == 0).sum()),
                 "perplexity": float(perplexity(counts))}
        codes_reset = 0
        if qc.reset and epoch < tc.epochs - 1:  # never after the last epoch: the saved tokenizer is the validated one
            codes_reset = int(quantizer.reset_dead_codes(counts, fraction=qc.reset_fraction, noise=qc.reset_noise,
                                                         generator=derived_generator(tc.seed, RESET_STREAM, epoch)))
        epoch_counts = counts.cpu()
        parts.counts.zero_()
        scheduler.step()
        elapsed += time.perf_counter() - epoch_start  # training, validation and reset
        record = {"epoch": epoch + 1, "step": step, "lr": lrs[0], "codebook_lr": lrs[0],
                  "rectifier_lr": lrs[1] if len(lrs) > 1 else None,
                  "train_quant_mse": stats["train_quant_mse"], "train_rect_mse": stats["train_rect_mse"],
                  **val, **usage, "codes_reset": codes_reset,
                  "samples_per_s": stats["samples"] / max(stats["train_time_s"], 1e-9), "elapsed_s": elapsed}
        if ctx.is_main:
            append_metrics(run / METRICS_NAME, record)
        log(f"{prefix} step {step} | train quant {record['train_quant_mse']:.5f} rect {record['train_rect_mse']:.5f}"
            f" | val quant {val['val_quant_mse']:.5f} rect {val['val_rect_mse']:.5f} | usage "
            f"{usage['codebook_usage']:.1%} dead {usage['dead_codes']} reset {codes_reset} perplexity "
            f"{usage['perplexity']:.1f} | {record['samples_per_s']:,.0f} samples/s | {elapsed:.1f} s")
        save_checkpoint(run / CHECKPOINT_NAME, {
            "epoch": epoch + 1, "step": step, "elapsed_s": elapsed,
            "quantizer": quantizer.state_dict(), "rectifier": rectifier.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "usage_counts": epoch_counts}, ctx)

    # --- finish: the tokenizer, loadable without this code -------------------------------------
    if ctx.is_main:
        tokenizer = RevqTokenizer(
            normalizer, quantizer, rectifier,
            config={"rectifier": dataclasses.asdict(cfg.rectifier), "search_memory_mb": qc.search_memory_mb, "normalizer": {
                "statistics": "per-element population mean and std of the training cache",
                "train_cache": str(train_cache.path), "num_samples": train_cache.num_samples}},
            vae_identity=train_cache.manifest.vae, image_recipe=train_cache.manifest.image)
        tokenizer.save_pretrained(run / TOKENIZER_DIR)
        log(f"tokenizer written to {run / TOKENIZER_DIR} (RevqTokenizer.from_pretrained loads it)")
    ctx.barrier()
    return run


def _check_sizes(cfg: RevqConfig, latent_shape: tuple[int, ...], train_cache: LatentCache) -> None:
    """Refuse token counts that do not tile the latent and codebooks bigger than the training set."""
    size = 1
    for s in latent_shape:
        size *= s
    tokens = cfg.quantizer.num_tokens
    if size % tokens:
        divisors = [t for t in range(1, size + 1) if size % t == 0]
        raise ValueError(f"quantizer.num_tokens={tokens} does not divide the latent size C*H*W = "
                         f"{'x'.join(map(str, latent_shape))} = {size} of {train_cache.path}; choose one of "
                         f"{', '.join(map(str, divisors[-10:]))} (or another divisor of {size})")
    n, k = train_cache.num_samples, cfg.quantizer.codebook_size
    if k > n and not cfg.train.allow_small_cache:
        raise ValueError(f"quantizer.codebook_size={k} is larger than the {n} training latents in {train_cache.path}, "
                         "so the codebooks cannot be initialised from distinct training tokens; use a smaller "
                         "codebook or a bigger cache, or set train.allow_small_cache=true to accept repeated codes")


def _init_codebooks(quantizer: MultiGroupQuantizer, normalizer: LatentNormalizer, train_data: LatentSource,
                    cfg: RevqConfig, ctx: DistContext) -> None:
    """Initialise the codebooks from training tokens on rank 0 and broadcast them to every rank."""
    if ctx.is_main:
        generator = derived_generator(cfg.train.seed, INIT_STREAM)
        count = min(train_data.num_samples, _INIT_CANDIDATES_PER_CODE * cfg.quantizer.codebook_size)
        with torch.no_grad():
            tokens = quantizer.to_tokens(normalizer.normalize(train_data.sample(count, generator)))  # (n, T, d)
        quantizer.init_from_samples(tokens, method=cfg.quantizer.init, generator=generator,
                                    allow_replacement=cfg.train.allow_small_cache)
        del tokens
    ctx.broadcast_(quantizer.codebooks.data)
