"""Stage two: train the multi-group quantizer and the rectifier on cached latents.

Reads top to bottom: setup (caches, checks, run directory), data, model (fresh, or started from a
tokenizer with train.init_from), the epoch loop (train, validate, usage + non-activation reset,
metrics line, checkpoint), finish (tokenizer/). Resume is automatic: a run directory holding a
checkpoint continues from its last finished epoch and reproduces an uninterrupted run exactly; a
larger train.epochs extends a finished run (stages/run_dir.py says which settings may change).

The result does not depend on the number of ranks or on where the data lives: train.batch_size is the
global batch, each of W ranks trains on its b = B / W share of every global batch (cache/loader.py), the
codebook gradient is assembled from the whole global batch on every rank (train_loop.codebook_gradient),
and the codebook init, resets and validation are functions of the seed, the epoch and the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from revq_pipe.cache import storage
from revq_pipe.cache.loader import INIT_STREAM, RESET_STREAM, LatentSource, derived_generator, rank_share
from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.device import deterministic_kernels
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.precision import describe as describe_precision
from revq_pipe.pipeline.precision import job_precision
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer, check_init_samples, token_dim_of
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext, distributed
from revq_pipe.stages.run_dir import (CHECKPOINT_NAME, METRICS_NAME, TOKENIZER_DIR, append_metrics, resume_plan,
                                      save_checkpoint, start_run_dir)
from revq_pipe.stages.train_loop import (LrSchedule, TrainParts, TrainState, build_optimizer, fit_gate, train_epoch,
                                         validate)

INIT_CANDIDATES_PER_CODE = 2  # the codebook init draws from min(N, 2K) training latents
HOLDOUT_SHARE, HOLDOUT_RANGE = 0.02, (32, 10_000)  # training latents held out for the gate (train.gate_holdout=0)


def run_train(cfg: RevqConfig) -> Path:
    """Train on cfg.data.train_cache (validating on cfg.data.val_cache) into cfg.train.run; returns it."""
    if not cfg.train.run:
        raise ValueError("train.run is empty; pass --run DIR (a new folder, or a run to resume)")
    with contextlib.ExitStack() as job:
        job.enter_context(deterministic_kernels(cfg.train.deterministic))  # before any CUDA work
        ctx = job.enter_context(distributed(cfg.train.device, cfg.dist.timeout_minutes))
        job.enter_context(job_precision(cfg.train.precision))
        return _train(cfg, ctx)


def _train(cfg: RevqConfig, ctx: DistContext) -> Path:
    tc = cfg.train
    run = Path(tc.run)
    # --- setup: caches, checks, run directory (written only once every check has passed) --------
    train_cache = LatentCache.open(cfg.data.train_cache, options=cfg.storage_options())  # refuses an incomplete cache
    val_cache = LatentCache.open(cfg.data.val_cache, options=cfg.storage_options())
    train_cache.check_compatible(val_cache)
    init = _init_tokenizer(cfg, train_cache) if tc.init_from else None  # refuses another VAE or latent shape
    _check_sizes(cfg, train_cache, ctx)
    plan = resume_plan(cfg, ctx)
    if plan.checkpoint is not None:
        _refuse_other_data(plan.checkpoint, train_cache, run)
    if plan.finished:
        done = plan.checkpoint["epoch"]
        log(f"{run} has already finished its {done} epochs (tokenizer in {run / TOKENIZER_DIR}); nothing to "
            f"do. Pass --epochs N with N > {done} to extend it")
        return run
    start_run_dir(cfg, plan, ctx)
    torch.manual_seed(tc.seed)

    # --- data -----------------------------------------------------------------------------------
    with ctx.phase("load the caches"):
        data = _load_data(cfg, train_cache, val_cache, ctx)
    steps_per_epoch = data.train.steps_per_epoch(tc.batch_size)
    log(f"train data: {data.train.describe()}")
    if data.holdout is not None:
        log(f"held out:   {data.holdout.num_samples} of the training latents, to fit the rectifier's gate")
    log(f"val data:   {data.val.describe()}")

    # --- model: fresh, from a tokenizer, or from the checkpoint ------------------------------------
    parts = _build_parts(cfg, train_cache, init, ctx)
    if init is not None:  # where fine-tuning starts, on the new data: every epoch's record shows it beside its own
        data.init_scores = {f"init_{k}": v for k, v in validate(parts, data.val, tc.batch_size // ctx.world_size,
                                                               ctx).items()}
        log(f"the starting tokenizer on {val_cache.path}: val quant {data.init_scores['init_val_quant_mse']:.5f} "
            f"rect {data.init_scores['init_val_rect_mse']:.5f}")
    if data.holdout is None and parts.has_rectifier:  # no gate to fit: the rectifier's correction is used whole
        previous = float(parts.rectifier.residual_gate)
        parts.rectifier.residual_gate.fill_(1.0)
        if previous != 1.0:
            log(f"train.gate=false: the starting tokenizer's gate {previous:.3f} is set to 1 (its whole correction)")
    state = TrainState(parts, schedule_epochs=tc.epochs, data=_data_fingerprint(train_cache))
    if plan.checkpoint is not None:
        state.load_state_dict(plan.checkpoint)
        log(f"resuming {run} after epoch {state.epoch} (step {state.step})")
        if state.schedule_epochs != tc.epochs:
            log(f"extending the run: {state.epoch} epochs done, {tc.epochs} asked; its learning-rate schedule was "
                f"laid out for {state.schedule_epochs} epochs and keeps decaying at the same per-epoch rate beyond "
                f"them, below train.final_lr_fraction={tc.final_lr_fraction}")
    elif init is None:
        with ctx.phase("initialise the codebooks"):
            _init_codebooks(parts, data.train, cfg, ctx)
    schedule = LrSchedule(codebook_lr=tc.codebook_lr, rectifier_lr=tc.rectifier_lr,
                          schedule_epochs=state.schedule_epochs, final_fraction=tc.final_lr_fraction,
                          rectifier_warmup_steps=_rectifier_warmup(cfg, steps_per_epoch))
    log(f"model: T={parts.quantizer.num_tokens} tokens of d={parts.quantizer.token_dim}, "
        f"K={parts.quantizer.codebook_size} codes per position ({parts.quantizer.codebooks.numel():,} codebook "
        f"params), rectifier {cfg.rectifier.kind} {sum(p.numel() for p in parts.rect_params):,} params; "
        f"{steps_per_epoch} steps/epoch of global batch {tc.batch_size} = {ctx.world_size} rank(s) x "
        f"{tc.batch_size // ctx.world_size}, device {ctx.device}, precision {tc.precision}")

    # --- loop: one epoch = train, validate, usage and reset, metrics line, checkpoint -----------
    for epoch in range(state.epoch, tc.epochs):
        with ctx.phase(f"epoch {epoch + 1}"):
            record = _run_epoch(cfg, state, schedule, data, epoch, ctx)
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
                                    "epochs": tc.epochs, "init_from": tc.init_from or None,
                                    "global_batch": tc.batch_size, "ranks": ctx.world_size,
                                    "precision": {**describe_precision(tc.precision, "the rectifier"),
                                                  "codebook_search": "ieee float32, exact"},
                                    "deterministic": tc.deterministic},
                        "statistics": (f"the normalizer of {tc.init_from}" if init is not None and tc.init_statistics
                                       else "per-element population mean and std of the training cache")})
        tokenizer.save_pretrained(run / TOKENIZER_DIR)
        log(f"tokenizer written to {run / TOKENIZER_DIR} (RevqTokenizer.from_pretrained loads it)")
    with ctx.phase("write the tokenizer"):
        ctx.barrier()
    if ctx.is_main and tc.push_to:  # after the last collective: the other ranks never wait for an upload
        storage.upload_dir(run / TOKENIZER_DIR, tc.push_to, cfg.storage_options(), last=("config.json",))
        log(f"tokenizer pushed to {tc.push_to}")
    return run


def _run_epoch(cfg: RevqConfig, state: TrainState, schedule: LrSchedule, data: "TrainData", epoch: int,
               ctx: DistContext) -> dict:
    """Train one epoch, fit the gate, validate, count usage and reset dead codes; returns its metrics.jsonl
    record."""
    tc, qc, parts = cfg.train, cfg.quantizer, state.parts
    epoch_start = time.perf_counter()
    lrs = schedule.rates(epoch, state.step)
    prefix = f"epoch {epoch + 1}/{tc.epochs}"
    gated = data.holdout is not None and parts.has_rectifier
    if gated:  # training always fits the whole correction; the gate only decides how much of it is used
        parts.rectifier.residual_gate.fill_(1.0)
    stats = train_epoch(parts, data.train.epoch_batches(tc.batch_size, seed=tc.seed, epoch=epoch), schedule,
                        epoch=epoch, step=state.step, ctx=ctx, log_every=tc.log_every, log_prefix=prefix,
                        total_steps=data.train.steps_per_epoch(tc.batch_size))
    state.step = stats["step"]
    share = tc.batch_size // ctx.world_size
    gate = fit_gate(parts, data.holdout, share, ctx) if gated else {}
    val = validate(parts, data.val, share, ctx)
    ctx.all_reduce_sum_(parts.usage.counts)  # (T, K) uses over the epoch on all ranks
    usage = parts.usage.summary()
    codes_reset = 0
    # never after the last epoch (the saved tokenizer is the validated one), never on frozen codebooks
    if qc.reset and parts.train_codebooks and epoch < tc.epochs - 1:
        codes_reset = parts.quantizer.reset_dead_codes(parts.usage.counts, fraction=qc.reset_fraction,
                                                       noise=qc.reset_noise,
                                                       generator=derived_generator(tc.seed, RESET_STREAM, epoch))
    parts.usage.zero_()
    epoch_s = time.perf_counter() - epoch_start  # training, validation and reset
    state.elapsed_s += epoch_s
    state.epoch = epoch + 1
    record = {"epoch": epoch + 1, "step": state.step, "lr": lrs[0] if parts.train_codebooks else None,
              "rectifier_lr": lrs[1] if parts.train_rectifier else None, "precision": tc.precision,
              "train_quant_mse": stats["train_quant_mse"], "train_rect_mse": stats["train_rect_mse"],
              **gate, **val, **data.init_scores, **usage, "codes_reset": int(codes_reset),
              "searches_repeated": parts.searches_repeated,
              "samples_per_s": stats["samples"] / max(stats["train_time_s"], 1e-9), "elapsed_s": state.elapsed_s}
    parts.searches_repeated = 0
    remaining = (tc.epochs - epoch - 1) * epoch_s
    gate_note = f" gate {gate['gate']:.3f} (held out: quant {gate['holdout_quant_mse']:.5f} rect " \
                f"{gate['holdout_rect_mse']:.5f}) |" if gate else ""
    log(f"{prefix} step {state.step} | train quant {record['train_quant_mse']:.5f} rect "
        f"{record['train_rect_mse']:.5f} |{gate_note} val quant {val['val_quant_mse']:.5f} rect "
        f"{val['val_rect_mse']:.5f} | "
        f"usage {usage['codebook_usage']:.1%} dead {usage['dead_codes']} reset {codes_reset} perplexity "
        f"{usage['perplexity']:.1f} | {record['samples_per_s']:,.0f} samples/s | {state.elapsed_s:.1f} s, "
        f"run eta {remaining:,.0f} s")
    return record


@dataclass
class TrainData:
    """The splits one run reads."""

    train: LatentSource  # what the optimizer steps on
    holdout: LatentSource | None  # training latents held out to fit the rectifier's gate (None: no gate)
    val: LatentSource
    init_scores: dict = field(default_factory=dict)  # the starting tokenizer's val MSEs, when fine-tuning


def _load_data(cfg: RevqConfig, train_cache: LatentCache, val_cache: LatentCache, ctx: DistContext) -> TrainData:
    tc = cfg.train
    whole = LatentSource(train_cache, ctx.device, tc.data_on_device, rank=ctx.rank, world_size=ctx.world_size,
                         shuffle_window=tc.shuffle_window)
    val = LatentSource(val_cache, ctx.device, tc.data_on_device, rank=ctx.rank, world_size=ctx.world_size)
    count = holdout_count(cfg, train_cache.num_samples)
    if not count:
        return TrainData(train=whole, holdout=None, val=val)
    train, holdout = whole.split_off(count, tc.seed)
    return TrainData(train=train, holdout=holdout, val=val)


def holdout_count(cfg: RevqConfig, num_samples: int) -> int:
    """How many training latents are held out to fit the gate: train.gate_holdout, or 2% of the split between
    HOLDOUT_RANGE (at most a tenth of it); none without a gate or a rectifier."""
    if not cfg.train.gate or cfg.rectifier.kind == "none":
        return 0
    if cfg.train.gate_holdout:
        return cfg.train.gate_holdout
    low, high = HOLDOUT_RANGE
    return min(max(low, round(HOLDOUT_SHARE * num_samples)), high, num_samples // 10)


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
        quantizer = MultiGroupQuantizer(train_cache.latent_shape, qc.num_tokens, qc.codebook_size)
        rectifier = build_rectifier(cfg.rectifier, train_cache.latent_shape[0])
    quantizer.search_memory_mb = qc.search_memory_mb  # a setting of this machine, not of the tokenizer
    normalizer, quantizer, rectifier = normalizer.to(device), quantizer.to(device), rectifier.to(device).train()
    train_codebooks = "codebooks" in tc.trainable
    quantizer.codebooks.requires_grad_(train_codebooks)
    rectifier.requires_grad_("rectifier" in tc.trainable)  # frozen, it still rectifies
    rect_params = [p for p in rectifier.parameters() if p.requires_grad]
    rectify = rectifier
    if ctx.is_distributed and rect_params:
        rectify = torch.nn.parallel.DistributedDataParallel(
            rectifier, device_ids=[device] if device.type == "cuda" else None)
    if tc.compile and rect_params:
        rectify = torch.compile(rectify)
    optimizer = build_optimizer(quantizer.codebooks if train_codebooks else None, rect_params,
                                codebook_lr=tc.codebook_lr, codebook_weight_decay=tc.codebook_weight_decay,
                                rectifier_lr=tc.rectifier_lr, rectifier_weight_decay=tc.rectifier_weight_decay)
    return TrainParts(normalizer=normalizer, quantizer=quantizer, rectifier=rectifier, rectify=rectify,
                      optimizer=optimizer, train_rectifier=bool(rect_params), grad_clip=tc.grad_clip,
                      precision=tc.precision, deferred_search=device.type == "cuda",
                      train_codebooks=train_codebooks, has_rectifier=cfg.rectifier.kind != "none")


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


def _check_sizes(cfg: RevqConfig, train_cache: LatentCache, ctx: DistContext) -> None:
    """Refuse, before anything is written, token counts that do not tile the latent, codebooks bigger than
    the training set, and a global batch that the ranks cannot share or the split cannot fill."""
    try:
        token_dim_of(train_cache.latent_shape, cfg.quantizer.num_tokens, name="quantizer.num_tokens")
    except ValueError as error:
        raise ValueError(f"{error} (the latents of {train_cache.path})") from None
    held_out = holdout_count(cfg, train_cache.num_samples)
    trained = train_cache.num_samples - held_out
    if held_out and trained < train_cache.num_samples // 2:
        raise ValueError(f"train.gate_holdout={held_out} leaves {trained} of the {train_cache.num_samples} latents "
                         f"of {train_cache.path} to train on; hold out fewer (0 = automatic) or set train.gate=false")
    if not cfg.train.init_from:
        check_init_samples(cfg.quantizer.codebook_size, trained, cfg.train.allow_small_cache,
                           what=f"training latents in {train_cache.path} (after holding out {held_out} for the gate)",
                           fix="use a smaller codebook or a bigger cache, or set train.allow_small_cache=true to "
                               "accept repeated codes")
    rank_share(cfg.train.batch_size, ctx.world_size)
    if cfg.train.batch_size > trained:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (the global batch) is more than the {trained} "
                         f"training latents in {train_cache.path} (after holding out {held_out} for the gate); "
                         "lower train.batch_size")


def _data_fingerprint(cache: LatentCache) -> dict:
    """What identifies the training data a run's batch order is built from (checked on resume)."""
    manifest = cache.manifest
    return {"num_samples": manifest.num_samples, "latent_shape": list(manifest.latent_shape),
            "vae_weights_sha256": manifest.vae.get("weights_sha256"), "source": manifest.source,
            "statistics_sha256": cache.statistics_sha256()}


def _refuse_other_data(checkpoint: dict, cache: LatentCache, run: Path) -> None:
    """A resumed run must read the same training data: its order of batches is a function of it."""
    recorded, now = checkpoint.get("data"), _data_fingerprint(cache)
    if recorded is not None and recorded != now:
        changed = [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in now.items()
                   if recorded.get(key) != value]
        raise ValueError(f"the train cache {cache.path} holds other data than the run {run} was trained on "
                         f"({'; '.join(changed)}); resuming would change the order of batches. Point "
                         "--train-cache at the original cache, or use a new --run")


def _init_codebooks(parts: TrainParts, train_data: LatentSource, cfg: RevqConfig, ctx: DistContext) -> None:
    """Initialise the codebooks from training tokens, on every rank at once (the same sample and generator
    give every rank the same codes, so nobody waits for rank 0); a checksum confirms they agree."""
    quantizer = parts.quantizer
    generator = derived_generator(cfg.train.seed, INIT_STREAM)
    count = min(train_data.num_samples, INIT_CANDIDATES_PER_CODE * cfg.quantizer.codebook_size)
    with torch.no_grad():
        tokens = quantizer.to_tokens(parts.normalizer.normalize(train_data.sample(count, generator)))  # (n, T, d)
    quantizer.init_from_samples(tokens, method=cfg.quantizer.init, generator=generator,
                                allow_replacement=cfg.train.allow_small_cache)
    del tokens
    if ctx.is_distributed:
        codes = quantizer.codebooks.detach().double()
        mine = torch.stack([codes.sum(), codes.square().sum()])
        low, high = ctx.all_reduce_min_(mine.clone()), -ctx.all_reduce_min_(-mine)
        if not torch.equal(low, high):  # ranks on different hardware may round differently: rank 0 decides
            log("the ranks' codebook inits differ in rounding; taking rank 0's")
            ctx.broadcast_(quantizer.codebooks.data)
