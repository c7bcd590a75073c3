"""`revq-pipe prior train`: a class-conditional autoregressive prior (pipeline/prior.py) on a token store.

Reads top to bottom like stage two (stages/train.py): setup (token stores, checks, run directory),
data (every row of the stores, in memory: T ids per view are small), model (fresh, or from the
checkpoint), the epoch loop (train, validate, metrics line, checkpoint), finish (RUN/prior/).

The number of processes never changes what is computed: prior.batch_size is the global batch, split
evenly across ranks (a batch that does not divide is refused); the order of the global batches and
which rows lose their class to the null class are drawn once per epoch from a generator seeded by
(seed, epoch); rank r takes the r-th contiguous slice of every global batch, and DDP averages the
gradients, so 1 rank and N ranks take the same steps up to float summation order. Resume is
automatic from RUN/checkpoint.pt (written after every epoch); a finished run started again is a
no-op, and a larger prior.epochs extends it at the final learning rate.

    RUN/config.yaml  RUN/metrics.jsonl  RUN/checkpoint.pt  RUN/prior/ (config.json, model.safetensors)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from revq_pipe.cache.collective import rank_slice
from revq_pipe.cache.loader import SHUFFLE_STREAM, derived_generator
from revq_pipe.cache.token_store import TokenStore
from revq_pipe.pipeline.files import atomic_directory
from revq_pipe.pipeline.precision import describe as describe_precision
from revq_pipe.pipeline.precision import job_precision
from revq_pipe.pipeline.prior import PriorSpec, TokenPrior, bits_per_token
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext, distributed
from revq_pipe.stages.run_dir import (CHECKPOINT_NAME, METRICS_NAME, RunKind, append_metrics, load_checkpoint,
                                      resume_plan, save_checkpoint, start_run_dir, tokenizer_identity)

PRIOR_DIR = "prior"
PRIOR_CONFIG, PRIOR_WEIGHTS = "config.json", "model.safetensors"
# Settings a resumed prior run may change: they only say how long it runs, where, and how it samples and is
# evaluated later.
PRIOR_RESUME_FREE_KEYS = ("prior.run", "prior.epochs", "prior.device", "prior.log_every", "prior.cfg_scale",
                          "prior.temperature", "prior.top_k", "prior.eval_samples_per_class", "prior.cas_epochs",
                          "prior.cas_max_train_images", "prior.num_workers")
PRIOR_RUN = RunKind("prior.run", "prior.epochs", "revq-prior-checkpoint", 1,
                    lambda key: key.startswith("prior.") and key not in PRIOR_RESUME_FREE_KEYS)


def run_prior_train(cfg: RevqConfig) -> Path:
    """Train the prior on cfg.prior.train_tokens (validating on cfg.prior.val_tokens) into cfg.prior.run."""
    if not cfg.prior.run:
        raise ValueError("prior.run is empty; pass --run DIR (a new folder, or a prior run to resume)")
    with contextlib.ExitStack() as job:
        ctx = job.enter_context(distributed(cfg.prior.device, cfg.dist.timeout_minutes))
        job.enter_context(job_precision(cfg.prior.precision))
        return _train(cfg, ctx)


def _train(cfg: RevqConfig, ctx: DistContext) -> Path:
    pc, run = cfg.prior, Path(cfg.prior.run)
    # --- setup: stores, checks, run directory (written only once every check has passed) -----------
    train_store, val_store = open_token_stores(cfg)
    local_batch = local_batch_size(pc.batch_size, ctx.world_size)
    train_rows, val_rows = TokenRows.of(train_store), TokenRows.of(val_store)
    num_classes = train_rows.num_classes
    val_rows.check_classes(num_classes, val_store.path)
    steps_per_epoch = train_rows.num_rows // pc.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"prior.batch_size={pc.batch_size} is more than the {train_rows.num_rows} rows of "
                         f"{train_store.path}; lower prior.batch_size")
    plan = resume_plan(cfg, ctx, PRIOR_RUN)
    if plan.finished:
        log(f"{run} has already finished its {pc.epochs} epochs (prior in {run / PRIOR_DIR}); nothing to do. Pass "
            f"--epochs N with N > {pc.epochs} to extend it")
        return run
    start_run_dir(cfg, plan, ctx, PRIOR_RUN)
    log(f"train tokens: {train_store.path}: {train_rows.describe()}")
    log(f"val tokens:   {val_store.path}: {val_rows.describe()}")

    # --- model: fresh (the same seeded init on every rank), or from the checkpoint ------------------
    codebooks = store_tokenizer(train_store, "cpu").quantizer.codebooks.detach()
    spec = PriorSpec(num_tokens=train_store.num_tokens, codebook_size=train_store.codebook_size,
                     token_dim=codebooks.shape[2], num_classes=num_classes, width=pc.width, depth=pc.depth,
                     heads=pc.heads, code_width=pc.code_width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(pc.seed)
        model = TokenPrior(spec, codebooks).to(ctx.device)
    optimizer = build_optimizer(model, pc.lr, pc.weight_decay)
    state = {"epoch": 0, "step": 0, "schedule_epochs": pc.epochs, "elapsed_s": 0.0}
    if plan.checkpoint is not None:
        model.load_state_dict(plan.checkpoint["model"])
        optimizer.load_state_dict(plan.checkpoint["optimizer"])
        state = {key: plan.checkpoint[key] for key in state}
        log(f"resuming {run} after epoch {state['epoch']} (step {state['step']})")
        if state["schedule_epochs"] != pc.epochs:
            log(f"extending the run from {state['schedule_epochs']} to {pc.epochs} epochs at the final learning rate "
                f"({pc.final_lr_fraction} x prior.lr)")
    trained = model
    if ctx.is_distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    schedule = PriorSchedule(lr=pc.lr, warmup_steps=pc.warmup_steps, final_fraction=pc.final_lr_fraction,
                             total_steps=state["schedule_epochs"] * steps_per_epoch)
    log(f"prior: {spec.depth} blocks of width {spec.width}, {count_parameters(model):,} parameters for T={spec.num_tokens} "
        f"positions of K={spec.codebook_size} codes, {num_classes} classes + null; {steps_per_epoch} steps/epoch of "
        f"{pc.batch_size} rows ({local_batch} per rank x {ctx.world_size}), device {ctx.device}, precision {pc.precision}")

    # --- loop: one epoch = train, validate, metrics line, checkpoint --------------------------------
    for epoch in range(state["epoch"], pc.epochs):
        start, first_step = time.perf_counter(), state["step"]
        train_bits, step = _train_epoch(cfg, trained, model, optimizer, schedule, train_rows, epoch, state["step"], ctx)
        val_bits = validation_bits(model, val_rows, local_batch, ctx, pc.precision)
        epoch_s = time.perf_counter() - start
        state.update(epoch=epoch + 1, step=step, elapsed_s=state["elapsed_s"] + epoch_s)
        record = {"epoch": epoch + 1, "step": step, "lr": schedule.rate(first_step),
                  "train_bits_per_token": train_bits / spec.num_tokens, "train_bits_per_image": train_bits,
                  "val_bits_per_token": val_bits / spec.num_tokens, "val_bits_per_image": val_bits,
                  "tokenizer_bits_per_image": tokenizer_bits(spec), "precision": pc.precision,
                  "tokens_per_s": steps_per_epoch * pc.batch_size * spec.num_tokens / epoch_s,
                  "elapsed_s": state["elapsed_s"]}
        log(f"epoch {epoch + 1}/{pc.epochs} step {step} | train {train_bits:,.1f} bits/image | val {val_bits:,.1f} "
            f"bits/image ({record['val_bits_per_token']:.3f}/token; raw {record['tokenizer_bits_per_image']:,.0f}) | "
            f"{record['tokens_per_s']:,.0f} tokens/s | {state['elapsed_s']:.1f} s")
        if ctx.is_main:
            append_metrics(run / METRICS_NAME, record)
        save_checkpoint(run / CHECKPOINT_NAME, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "spec": spec.to_json(), **state}, ctx, PRIOR_RUN)

    # --- finish: the prior, loadable without the checkpoint --------------------------------------------
    if ctx.is_main:
        save_prior(run / PRIOR_DIR, model, {"train_tokens": str(train_store.path), "val_tokens": str(val_store.path),
                                            "tokenizer": train_store.attrs["tokenizer"], "epochs": pc.epochs,
                                            "precision": describe_precision(pc.precision, "the prior transformer"),
                                            "rows": train_rows.num_rows})
        log(f"prior written to {run / PRIOR_DIR}; sample with `revq-pipe prior sample --run {run}`")
    ctx.barrier()
    return run


def _train_epoch(cfg: RevqConfig, trained: torch.nn.Module, model: TokenPrior, optimizer: torch.optim.Optimizer,
                 schedule: "PriorSchedule", rows: "TokenRows", epoch: int, step: int, ctx: DistContext
                 ) -> tuple[float, int]:
    """One epoch over this rank's slices of the global batches; returns (mean train bits per image, step)."""
    pc = cfg.prior
    model.train()
    bits_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (bits, rows) over the epoch, this rank
    started, total = time.perf_counter(), rows.num_rows // pc.batch_size
    for taken, (ids, labels) in enumerate(rows.epoch_batches(pc.batch_size, pc.class_dropout, seed=pc.seed,
                                                              epoch=epoch, ctx=ctx, null_class=model.spec.null_class)):
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate(step)
        with prior_autocast(pc.precision, ctx.device):
            logits = trained(ids, labels)  # (B, T, K)
        bits = bits_per_token(logits, ids)  # (B, T)
        loss = bits.mean() * math.log(2.0)  # nats per token: the cross-entropy
        if not torch.isfinite(loss):
            raise ValueError(f"the prior's loss is {loss.item()} at epoch {epoch + 1}, step {step}; lower prior.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
        optimizer.step()
        step += 1
        bits_sum += torch.stack([bits.detach().sum(dtype=torch.float64), torch.tensor(len(ids), device=ctx.device,
                                                                                        dtype=torch.float64)])
        if pc.log_every and step % pc.log_every == 0:
            rate = (taken + 1) * pc.batch_size * model.spec.num_tokens / (time.perf_counter() - started)
            log(f"epoch {epoch + 1} step {step} ({taken + 1}/{total}) | {bits.detach().sum(1).mean().item():,.1f} "
                f"bits/image | lr {schedule.rate(step - 1):.2e} | {rate:,.0f} tokens/s")
    ctx.all_reduce_sum_(bits_sum)
    return float(bits_sum[0] / bits_sum[1]), step


def prior_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The transformer under bfloat16 autocast for policy "bf16" (training and scoring; sampling stays float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def validation_bits(model: TokenPrior, rows: "TokenRows", batch_size: int, ctx: DistContext, precision: str) -> float:
    """Mean negative log2-likelihood per image (all T tokens) of every row, with its true class."""
    model.eval()
    lo, hi = rank_slice(rows.num_rows, ctx.rank, ctx.world_size)
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for start in range(lo, hi, batch_size):
        ids, labels = rows.batch(np.arange(start, min(start + batch_size, hi)), ctx.device, model.spec.null_class)
        with prior_autocast(precision, ctx.device):
            logits = model(ids, labels)
        sums[0] += bits_per_token(logits, ids).sum(dtype=torch.float64)
        sums[1] += len(ids)
    ctx.all_reduce_sum_(sums)
    return float(sums[0] / sums[1])


# --- data -------------------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """Every row (view) of a token store in memory: ids (rows, T) in the stored dtype, labels (rows,) (-1 unknown)."""

    ids: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, store: TokenStore) -> "TokenRows":
        return cls(ids=store.ids(), labels=store.labels().astype(np.int64))

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Class ids 0..C-1 seen in the labels (0 when every label is unknown)."""
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

    def check_classes(self, num_classes: int, where: Any) -> None:
        if self.num_classes > num_classes:
            raise ValueError(f"{where} has class ids up to {self.num_classes - 1}, but the training tokens only "
                             f"0..{num_classes - 1}; validate on tokens of the same classes")

    def describe(self) -> str:
        known = self.labels >= 0
        return (f"{self.num_rows:,} rows of {self.ids.shape[1]} ids, {self.num_classes} classes"
                + ("" if known.all() else f", {int((~known).sum()):,} rows without a class (trained as the null class)"))

    def batch(self, index: np.ndarray, device: torch.device, null_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) int64 and class ids (B,) of the given rows, unknown classes as the null class."""
        labels = self.labels[index]
        labels = np.where(labels >= 0, labels, null_class)
        return (torch.from_numpy(self.ids[index].astype(np.int64)).to(device),
                torch.from_numpy(labels).to(device))

    def epoch_batches(self, global_batch: int, class_dropout: float, *, seed: int, epoch: int, ctx: DistContext,
                      null_class: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of every global batch of the epoch; a function of (seed, epoch, data) only."""
        generator = derived_generator(seed, SHUFFLE_STREAM, epoch)
        steps = self.num_rows // global_batch
        order = torch.randperm(self.num_rows, generator=generator)[:steps * global_batch].view(steps, global_batch)
        dropped = torch.rand(steps, global_batch, generator=generator) < class_dropout  # class -> null class
        local = global_batch // ctx.world_size
        mine = slice(ctx.rank * local, (ctx.rank + 1) * local)
        for index, drop in zip(order[:, mine].numpy(), dropped[:, mine]):
            ids, labels = self.batch(index, ctx.device, null_class)
            yield ids, torch.where(drop.to(ctx.device), null_class, labels)


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Rows per rank of a global batch; refused unless it divides evenly."""
    if global_batch % world_size:
        raise ValueError(f"prior.batch_size={global_batch} (the global batch) does not divide evenly across "
                         f"{world_size} ranks; choose a multiple of {world_size}")
    return global_batch // world_size


# --- pieces ------------------------------------------------------------------------------------------


@dataclass
class PriorSchedule:
    """Learning rate per step: linear warm-up, cosine decay to `final_fraction` at `total_steps`, then constant."""

    lr: float
    warmup_steps: int
    final_fraction: float
    total_steps: int

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.lr * (self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: TokenPrior, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95 as LlamaGen), weight decay on matrices and embeddings, not on biases and norms."""
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), fused=True)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tokenizer_bits(spec: PriorSpec) -> float:
    """T log2 K: the bits of an image's ids without a model (every code of every position equally likely)."""
    return spec.num_tokens * math.log2(spec.codebook_size)


def open_token_stores(cfg: RevqConfig) -> tuple[TokenStore, TokenStore]:
    """The train and val token stores of cfg.prior, checked to hold ids of one tokenizer."""
    options = cfg.storage_options()
    train, val = (TokenStore.open(location, options) for location in (cfg.prior.train_tokens, cfg.prior.val_tokens))
    if train.attrs["tokenizer"]["model_sha256"] != val.attrs["tokenizer"]["model_sha256"]:
        raise ValueError(f"the token stores {train.path} and {val.path} hold ids of different tokenizers "
                         f"({train.attrs['tokenizer']['dir']} vs {val.attrs['tokenizer']['dir']}); tokenize both splits "
                         "with the same --run")
    return train, val


def store_tokenizer(store: TokenStore, device: str | torch.device) -> RevqTokenizer:
    """The tokenizer a token store's ids came from (recorded in the store), refused if it has changed since."""
    recorded = store.attrs["tokenizer"]
    directory = Path(recorded["dir"])
    if not directory.is_dir():
        raise FileNotFoundError(f"the tokenizer {directory} that {store.path} records is gone; put it back, or "
                                "tokenize again with a tokenizer that exists")
    found = tokenizer_identity(directory)["model_sha256"]
    if found != recorded["model_sha256"]:
        raise ValueError(f"the tokenizer at {directory} has changed since {store.path} was written (model sha256 "
                         f"{found[:12]}... != {recorded['model_sha256'][:12]}...); tokenize again with it")
    return RevqTokenizer.from_pretrained(directory, device=device)


# --- the trained prior ---------------------------------------------------------------------------------


def save_prior(directory: Path, model: TokenPrior, provenance: dict[str, Any]) -> Path:
    """RUN/prior: config.json (spec + where it was trained from) and model.safetensors, replaced as a whole."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / PRIOR_WEIGHTS, metadata={"format": "pt"})
        (tmp / PRIOR_CONFIG).write_text(json.dumps({"spec": model.spec.to_json(), "provenance": provenance},
                                                   indent=2) + "\n")
    return directory


def load_prior(run: str | Path, device: torch.device) -> tuple[TokenPrior, dict[str, Any]]:
    """RUN/prior as a model in eval mode, and its provenance; an error says how far an unfinished run got."""
    run = Path(run)
    directory = run / PRIOR_DIR
    if not (directory / PRIOR_WEIGHTS).is_file():
        checkpoint = run / CHECKPOINT_NAME
        if checkpoint.is_file():
            done = load_checkpoint(checkpoint, PRIOR_RUN)["epoch"]
            raise FileNotFoundError(f"the prior run {run} is not finished ({done} epochs done, no {PRIOR_DIR}/ yet); "
                                    f"rerun `revq-pipe prior train --run {run}` to finish it")
        raise FileNotFoundError(f"no trained prior in {directory}; pass --run with the directory of a finished "
                                "`revq-pipe prior train` run")
    recorded = json.loads((directory / PRIOR_CONFIG).read_text())
    spec = PriorSpec(**recorded["spec"])
    state = load_file(directory / PRIOR_WEIGHTS, device="cpu")
    model = TokenPrior(spec, state["codebooks"])
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), recorded["provenance"]
