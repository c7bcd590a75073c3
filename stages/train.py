"""Stage two: train the multi-group quantizer and the rectifier on cached latents.

Reads top to bottom: setup (caches, checks, run directory), data, model (fresh, or started from a
tokenizer with train.init_from), the epoch loop (train, validate, usage + non-activation reset,
metrics line, checkpoint), finish (tokenizer/). Resume is automatic: a run directory holding a
checkpoint continues from its last finished epoch and reproduces an uninterrupted run exactly; a
larger train.epochs extends a finished run (stages/run_dir.py says which settings may change).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from revq_pipe.cache import storage
from revq_pipe.cache.loader import INIT_STREAM, RESET_STREAM, LatentSource, derived_generator
from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext, distributed
from revq_pipe.stages.run_dir import (CHECKPOINT_NAME, METRICS_NAME, TOKENIZER_DIR, append_metrics, resume_plan,
                                      save_checkpoint, start_run_dir)
from revq_pipe.stages.train_loop import LrSchedule, TrainParts, TrainState, build_optimizer, train_epoch, validate

INIT_CANDIDATES_PER_CODE = 2  # the codebook init draws from min(N, 2K) training latents


def run_train(cfg: RevqConfig) -> Path:
    """Train on cfg.data.train_cache (validating on cfg.data.val_cache) into cfg.train.run; returns it."""
    if not cfg.train.run:
        raise ValueError("train.run is empty; pass --run DIR (a new folder, or a run to resume)")
    with distributed(cfg.train.device) as ctx:
        return _train(cfg, ctx)


def _train(cfg: RevqConfig, ctx: DistContext) -> Path:
    tc = cfg.train
    run = Path(tc.run)
    # --- setup: caches, checks, run directory (written only once every check has passed) --------
    train_cache = LatentCache.open(cfg.data.train_cache, options=cfg.storage_options())  # refuses an incomplete cache
    val_cache = LatentCache.open(cfg.data.val_cache, options=cfg.storage_options())
    train_cache.check_compatible(val_cache)
    _check_sizes(cfg, train_cache)
    init = _init_tokenizer(cfg, train_cache) if tc.init_from else None
    plan = resume_plan(cfg, ctx)
    if plan.finished:
        log(f"{run} has already finished its {tc.epochs} epochs (tokenizer in {run / TOKENIZER_DIR}); nothing to "
            f"do. Pass --epochs N with N > {tc.epochs} to extend it")
        return run
    start_run_dir(cfg, plan, ctx)
    torch.manual_seed(tc.seed)

    # --- data -----------------------------------------------------------------------------------
    train_data = LatentSource(train_cache, ctx.device, tc.data_on_device, rank=ctx.rank, world_size=ctx.world_size)
    val_data = LatentSource(val_cache, ctx.device, tc.data_on_device, rank=ctx.rank, world_size=ctx.world_size)
    steps_per_epoch = train_data.steps_per_epoch(tc.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={tc.batch_size} x {ctx.world_size} rank(s) is more than the "
                         f"{train_data.num_samples} training latents; lower train.batch_size")
    log(f"train data: {train_data.describe()}")
    log(f"val data:   {val_data.describe()}")

    # --- model: fresh, from a tokenizer, or from the checkpoint ------------------------------------
    parts = _build_parts(cfg, train_cache, init, ctx)
    state = TrainState(parts, schedule_epochs=tc.epochs)
    if plan.checkpoint is not None:
        state.load_state_dict(plan.checkpoint)
        log(f"resuming {run} after epoch {state.epoch} (step {state.step})")
        if state.schedule_epochs != tc.epochs:
            log(f"extending the run from {state.schedule_epochs} to {tc.epochs} epochs: the learning rate keeps "
                f"decaying at its per-epoch rate, below train.final_lr_fraction={tc.final_lr_fraction}")
    elif init is None:
        _init_codebooks(parts, train_data, cfg, ctx)
    schedule = LrSchedule(codebook_lr=tc.codebook_lr, rectifier_lr=tc.rectifier_lr,
                          schedule_epochs=state.schedule_epochs, final_fraction=tc.final_lr_fraction,
                          rectifier_warmup_steps=_rectifier_warmup(cfg, steps_per_epoch))
    log(f"model: T={parts.quantizer.num_tokens} tokens of d={parts.quantizer.token_dim}, "
        f"K={parts.quantizer.codebook_size} codes per position ({parts.quantizer.codebooks.numel():,} codebook "
        f"params), rectifier {cfg.rectifier.kind} {sum(p.numel() for p in parts.rect_params):,} params; "
        f"{steps_per_epoch} steps/epoch x {ctx.world_size} rank(s), batch {tc.batch_size} per rank, "
        f"device {ctx.device}")

    # --- loop: one epoch = train, validate, usage and reset, metrics line, checkpoint -----------
    for epoch in range(state.epoch, tc.epochs):
        record = _run_epoch(cfg, state, schedule, train_data, val_data, epoch, ctx)
        if ctx.is_main:
            append_metrics(run / METRICS_NAME, record)
        save_checkpoint(run / CHECKPOINT_NAME, state.state_dict(), ctx)

    # --- finish: the tokenizer, loadable without this code -------------------------------------
    if ctx.is_main:
        tokenizer = RevqTokenizer(
            parts.normalizer, parts.quantizer, parts.rectifier, rectifier_spec=cfg.rectifier,
            vae_identity=train_cache.manifest.vae, image_recipe=train_cache.manifest.image,
            provenance={"trained": {"run": str(run), "train_cache": str(train_cache.path),
                                    "val_cache": str(val_cache.path), "num_samples": train_cache.num_samples,
                                    "epochs": tc.epochs, "init_from": tc.init_from or None},
                        "statistics": (f"the normalizer of {tc.init_from}" if init is not None and tc.init_statistics
                                       else "per-element population mean and std of the training cache")})
        tokenizer.save_pretrained(run / TOKENIZER_DIR)
        log(f"tokenizer written to {run / TOKENIZER_DIR} (RevqTokenizer.from_pretrained loads it)")
        if tc.push_to:  # config.json last: whoever finds it finds the weights
            storage.upload_dir(run / TOKENIZER_DIR, tc.push_to, cfg.storage_options(), last=("config.json",))
            log(f"tokenizer pushed to {tc.push_to}")
    ctx.barrier()
    return run


def _run_epoch(cfg: RevqConfig, state: TrainState, schedule: LrSchedule, train_data: LatentSource,
               val_data: LatentSource, epoch: int, ctx: DistContext) -> dict:
    """Train one epoch, validate, count usage and reset dead codes; returns its metrics.jsonl record."""
    tc, qc, parts = cfg.train, cfg.quantizer, state.parts
    epoch_start = time.perf_counter()
    lrs = schedule.rates(epoch, state.step)
    prefix = f"epoch {epoch + 1}/{tc.epochs}"
    stats = train_epoch(parts, train_data.epoch_batches(tc.batch_size, seed=tc.seed, epoch=epoch), schedule,
                        epoch=epoch, step=state.step, ctx=ctx, log_every=tc.log_every, log_prefix=prefix,
                        total_steps=train_data.steps_per_epoch(tc.batch_size))
    state.step = stats["step"]
    val = validate(parts, val_data, tc.batch_size, ctx)
    ctx.all_reduce_sum_(parts.usage.counts)  # (T, K) uses over the epoch on all ranks
    usage = parts.usage.summary()
    codes_reset = 0
    if qc.reset and epoch < tc.epochs - 1:  # never after the last epoch: the saved tokenizer is the validated one
        codes_reset = parts.quantizer.reset_dead_codes(parts.usage.counts, fraction=qc.reset_fraction,
                                                       noise=qc.reset_noise,
                                                       generator=derived_generator(tc.seed, RESET_STREAM, epoch))
    parts.usage.zero_()
    epoch_s = time.perf_counter() - epoch_start  # training, validation and reset
    state.elapsed_s += epoch_s
    state.epoch = epoch + 1
    record = {"epoch": epoch + 1, "step": state.step, "lr": lrs[0], "codebook_lr": lrs[0],
              "rectifier_lr": lrs[1] if parts.train_rectifier else None,
              "train_quant_mse": stats["train_quant_mse"], "train_rect_mse": stats["train_rect_mse"],
              **val, **usage, "codes_reset": int(codes_reset),
              "samples_per_s": stats["samples"] / max(stats["train_time_s"], 1e-9), "elapsed_s": state.elapsed_s}
    remaining = (tc.epochs - epoch - 1) * epoch_s
    log(f"{prefix} step {state.step} | train quant {record['train_quant_mse']:.5f} rect "
        f"{record['train_rect_mse']:.5f} | val quant {val['val_quant_mse']:.5f} rect {val['val_rect_mse']:.5f} | "
        f"usage {usage['codebook_usage']:.1%} dead {usage['dead_codes']} reset {codes_reset} perplexity "
        f"{usage['perplexity']:.1f} | {record['samples_per_s']:,.0f} samples/s | {state.elapsed_s:.1f} s, "
        f"run eta {remaining:,.0f} s")
    return record


def _rectifier_warmup(cfg: RevqConfig, steps_per_epoch: int) -> int:
    """Steps of the rectifier's linear warm-up: train.rectifier_warmup_steps, at most the first epoch, and none
    for the reference's plain rectifier (kept exactly as the reference trains it)."""
    return min(cfg.train.rectifier_warmup_steps, steps_per_epoch) if cfg.rectifier.residual else 0


def _build_parts(cfg: RevqConfig, train_cache: LatentCache, init: RevqTokenizer | None,
                 ctx: DistContext) -> TrainParts:
    """Normalizer, quantizer and rectifier (from `init` when given), their DDP / compiled wrapper, AdamW."""
    tc, qc, device = cfg.train, cfg.quantizer, ctx.device
    if init is not None:
        normalizer = init.normalizer if tc.init_statistics else LatentNormalizer(train_cache.mean, train_cache.std)
        quantizer, rectifier = init.quantizer, init.rectifier
    else:
        normalizer = LatentNormalizer(train_cache.mean, train_cache.std)
        quantizer = MultiGroupQuantizer(train_cache.latent_shape, qc.num_tokens, qc.codebook_size,
                                        search_memory_mb=qc.search_memory_mb)
        rectifier = build_rectifier(cfg.rectifier, train_cache.latent_shape[0])
    normalizer, quantizer, rectifier = normalizer.to(device), quantizer.to(device), rectifier.to(device).train()
    rect_params = [p for p in rectifier.parameters() if p.requires_grad]
    rectify = rectifier
    if ctx.is_distributed and rect_params:
        rectify = torch.nn.parallel.DistributedDataParallel(
            rectifier, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile and rect_params:
        rectify = torch.compile(rectify)
    optimizer = build_optimizer(quantizer.codebooks, rect_params, codebook_lr=tc.codebook_lr,
                                codebook_weight_decay=tc.codebook_weight_decay, rectifier_lr=tc.rectifier_lr,
                                rectifier_weight_decay=tc.rectifier_weight_decay)
    return TrainParts(normalizer=normalizer, quantizer=quantizer, rectifier=rectifier, rectify=rectify,
                      optimizer=optimizer, train_rectifier=bool(rect_params), grad_clip=tc.grad_clip,
                      bf16=tc.bf16 and device.type == "cuda")


def _init_tokenizer(cfg: RevqConfig, train_cache: LatentCache) -> RevqTokenizer:
    """The tokenizer named by train.init_from, checked against the cache and the config's geometry."""
    tokenizer = RevqTokenizer.from_pretrained(cfg.train.init_from, device="cpu")
    train_cache.check_matches(tokenizer.vae_identity, tokenizer.latent_shape, what=f"the tokenizer {cfg.train.init_from}",
                              fix="fine-tune on a cache encoded with the tokenizer's VAE at its resolution")
    wanted = {"quantizer.num_tokens": tokenizer.num_tokens, "quantizer.codebook_size": tokenizer.codebook_size,
              **{f"rectifier.{k}": v for k, v in dataclasses.asdict(tokenizer.rectifier_spec).items()
                 if k != "forward"}}
    current = {"quantizer.num_tokens": cfg.quantizer.num_tokens, "quantizer.codebook_size": cfg.quantizer.codebook_size,
               **{f"rectifier.{k}": v for k, v in dataclasses.asdict(cfg.rectifier).items() if k != "forward"}}
    different = [f"{key}={value}" for key, value in wanted.items() if current[key] != value]
    if different:
        raise ValueError(f"the tokenizer {cfg.train.init_from} has another geometry than this config; to start from "
                         f"it pass --set {' --set '.join(different)}")
    log(f"starting from the tokenizer {cfg.train.init_from} ({'its' if cfg.train.init_statistics else 'the cache'}"
        " normalizer statistics)")
    return tokenizer


def _check_sizes(cfg: RevqConfig, train_cache: LatentCache) -> None:
    """Refuse token counts that do not tile the latent and codebooks bigger than the training set."""
    latent_shape = train_cache.latent_shape
    size = latent_shape[0] * latent_shape[1] * latent_shape[2]
    tokens = cfg.quantizer.num_tokens
    if size % tokens:
        divisors = [t for t in range(1, size + 1) if size % t == 0]
        raise ValueError(f"quantizer.num_tokens={tokens} does not divide the latent size C*H*W = "
                         f"{'x'.join(map(str, latent_shape))} = {size} of {train_cache.path}; choose one of "
                         f"{', '.join(map(str, divisors[-10:]))} (or another divisor of {size})")
    n, k = train_cache.num_samples, cfg.quantizer.codebook_size
    if k > n and not cfg.train.allow_small_cache and not cfg.train.init_from:
        raise ValueError(f"quantizer.codebook_size={k} is larger than the {n} training latents in {train_cache.path}, "
                         "so the codebooks cannot be initialised from distinct training tokens; use a smaller "
                         "codebook or a bigger cache, or set train.allow_small_cache=true to accept repeated codes")


def _init_codebooks(parts: TrainParts, train_data: LatentSource, cfg: RevqConfig, ctx: DistContext) -> None:
    """Initialise the codebooks from training tokens on rank 0 and broadcast them to every rank."""
    quantizer = parts.quantizer
    if ctx.is_main:
        generator = derived_generator(cfg.train.seed, INIT_STREAM)
        count = min(train_data.num_samples, INIT_CANDIDATES_PER_CODE * cfg.quantizer.codebook_size)
        with torch.no_grad():
            tokens = quantizer.to_tokens(parts.normalizer.normalize(train_data.sample(count, generator)))  # (n, T, d)
        quantizer.init_from_samples(tokens, method=cfg.quantizer.init, generator=generator,
                                    allow_replacement=cfg.train.allow_small_cache)
        del tokens
    ctx.broadcast_(quantizer.codebooks.data)
