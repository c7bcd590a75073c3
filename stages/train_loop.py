"""Pieces of stage two: the learning-rate schedule, the trained parts and their state, one training epoch,
validation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from revq_pipe.cache.loader import LatentSource
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import CodeUsage, MultiGroupQuantizer
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext

@dataclass
class LrSchedule:
    """The learning rate of both parameter groups at every step, a pure function of (epoch, step).

    Exponential decay once per epoch, from 1 at epoch 0 to `final_fraction` at epoch
    `schedule_epochs - 1` (docs/method.md). Past that epoch, as when a finished run is extended, the
    decay continues at the same per-epoch rate, below `final_fraction`: an extended run therefore
    differs from one started with more epochs (whose decay is slower), and says so in its log.
    The rectifier's rate also ramps up linearly over its first `rectifier_warmup_steps` steps: the
    identity-initialised rectifier would otherwise take full-size Adam steps on its first, noisy
    gradients and end its first epoch worse than the raw quantized latent.
    Being a pure function, it needs no state of its own in a checkpoint beyond its arguments.
    """

    codebook_lr: float
    rectifier_lr: float
    schedule_epochs: int
    final_fraction: float
    rectifier_warmup_steps: int = 0

    def epoch_factor(self, epoch: int) -> float:
        if self.schedule_epochs <= 1:
            return 1.0
        return self.final_fraction ** (epoch / (self.schedule_epochs - 1))

    def rates(self, epoch: int, step: int) -> tuple[float, float]:
        """(codebook lr, rectifier lr) for the optimizer step taken after `step` earlier steps."""
        factor = self.epoch_factor(epoch)
        warmup = min(1.0, (step + 1) / self.rectifier_warmup_steps) if self.rectifier_warmup_steps > 0 else 1.0
        return self.codebook_lr * factor, self.rectifier_lr * factor * warmup

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
        for group, lr in zip(optimizer.param_groups, self.rates(epoch, step)):
            group["lr"] = lr


# --- one epoch --------------------------------------------------------------------------------


@dataclass
class TrainParts:
    """The trained modules with what the loop needs around them."""

    normalizer: LatentNormalizer
    quantizer: MultiGroupQuantizer
    rectifier: torch.nn.Module  # the bare module (saved, validated)
    rectify: Callable[[torch.Tensor], torch.Tensor]  # DDP / compiled wrapper used for training
    optimizer: torch.optim.Optimizer
    train_rectifier: bool  # False for kind "none" (identity: no loss, no parameters)
    grad_clip: float
    bf16: bool  # autocast the rectifier to bfloat16 (CUDA only)
    usage: CodeUsage = field(init=False)  # code usage of the running epoch (the non-activation reset's input)
    rect_params: list[torch.nn.Parameter] = field(init=False)  # clipped as one group every step

    def __post_init__(self) -> None:
        q = self.quantizer
        self.rect_params = [p for p in self.rectifier.parameters() if p.requires_grad]
        self.usage = CodeUsage(q.num_tokens, q.codebook_size, q.codebooks.device)

    def rectifier_output(self, quantized: torch.Tensor, module: Callable) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            return module(quantized).float()


class NonFiniteLossError(ValueError):
    """Training produced a NaN or infinite loss."""


def build_optimizer(codebooks: torch.nn.Parameter, rect_params: list[torch.nn.Parameter], *, codebook_lr: float,
                    codebook_weight_decay: float, rectifier_lr: float, rectifier_weight_decay: float
                    ) -> torch.optim.AdamW:
    """AdamW with one group for the codebooks and one for the rectifier (none for kind "none").

    The fused implementation steps all parameters in one kernel (about 3x faster on CPU here).
    """
    groups = [{"params": [codebooks], "lr": codebook_lr, "weight_decay": codebook_weight_decay}]
    if rect_params:
        groups.append({"params": rect_params, "lr": rectifier_lr, "weight_decay": rectifier_weight_decay})
    return torch.optim.AdamW(groups, fused=True)


def train_step(parts: TrainParts, batch: torch.Tensor, ctx: DistContext | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on raw latents (B, C, H, W); returns (loss, quant MSE, rect MSE), detached."""
    q, opt = parts.quantizer, parts.optimizer
    z = parts.normalizer.normalize(batch)  # (B, C, H, W) standardized
    out = q(z)
    parts.usage.add(out.ids)
    loss = out.codebook_loss
    if parts.train_rectifier:
        rect_mse = F.mse_loss(parts.rectifier_output(out.quantized.detach(), parts.rectify), z)
        loss = loss + rect_mse
    else:  # the identity rectifier: its MSE is the quantization MSE
        rect_mse = out.codebook_loss.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if ctx is not None and ctx.is_distributed:  # DDP averages the rectifier; keep every rank's codebooks identical
        ctx.all_reduce_sum_(q.codebooks.grad).div_(ctx.world_size)
    if parts.grad_clip > 0:  # clipped separately for codebooks and rectifier, as the reference does
        torch.nn.utils.clip_grad_norm_([q.codebooks], parts.grad_clip)
        if parts.rect_params:
            torch.nn.utils.clip_grad_norm_(parts.rect_params, parts.grad_clip)
    opt.step()
    return loss.detach(), out.codebook_loss.detach(), rect_mse.detach()


def train_epoch(parts: TrainParts, batches: Iterator[torch.Tensor], schedule: LrSchedule, *, epoch: int, step: int,
                ctx: DistContext, log_every: int, log_prefix: str, total_steps: int | None = None) -> dict[str, float]:
    """One pass over this rank's batches; returns the epoch's mean MSEs (all ranks) and step/sample counts."""
    device = parts.quantizer.codebooks.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # quant MSE, rect MSE summed over steps
    window = torch.zeros(3, dtype=torch.float64, device=device)  # the same + steps since the last log line
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
    steps = samples = 0
    start = last = time.perf_counter()
    for batch in batches:
        schedule.apply(parts.optimizer, epoch, step)
        loss, quant_mse, rect_mse = train_step(parts, batch, ctx)

        step += 1
        steps += 1
        samples += batch.shape[0]
        pair = torch.stack([quant_mse, rect_mse]).double()
        sums += pair
        window[:2] += pair
        window[2] += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if step % log_every == 0:
            _raise_if_non_finite(first_bad, epoch, ctx)
            now = time.perf_counter()
            quant, rect = (window[:2] / window[2]).tolist()
            rate = window[2].item() * batch.shape[0] * ctx.world_size / max(now - last, 1e-9)
            eta = "" if total_steps is None else \
                f" epoch eta {(total_steps - steps) * (now - start) / steps:,.0f} s"
            log(f"{log_prefix} step {step} loss {quant + rect:.5f} quant_mse {quant:.5f} rect_mse {rect:.5f} "
                f"{rate:,.0f} samples/s{eta}{_memory_note(device)}")
            window.zero_()
            last = now
    _raise_if_non_finite(first_bad, epoch, ctx)
    totals = torch.cat([sums, torch.tensor([steps, samples], dtype=torch.float64, device=device)])
    ctx.all_reduce_sum_(totals)
    elapsed = time.perf_counter() - start
    return {"train_quant_mse": (totals[0] / totals[2]).item(), "train_rect_mse": (totals[1] / totals[2]).item(),
            "step": step, "samples": int(totals[3].item()), "train_time_s": elapsed}


def _raise_if_non_finite(first_bad: torch.Tensor, epoch: int, ctx: DistContext) -> None:
    """Stop every rank together when any rank saw a non-finite loss."""
    bad = first_bad.clone()
    bad[bad < 0] = torch.iinfo(torch.int64).max
    if ctx.is_distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    if bad.item() != torch.iinfo(torch.int64).max:
        raise NonFiniteLossError(
            f"the training loss became non-finite at epoch {epoch + 1}, step {bad.item()}; lower "
            "train.codebook_lr / train.rectifier_lr, and check the caches for NaN or infinite latents")


def _memory_note(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f" mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


# --- validation -------------------------------------------------------------------------------


@torch.no_grad()
def validate(parts: TrainParts, source: LatentSource, batch_size: int, ctx: DistContext) -> dict[str, float]:
    """Quantization and rectified MSE on the whole validation split (standardized space)."""
    device = parts.quantizer.codebooks.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # quant SSE, rect SSE, elements
    parts.rectifier.eval()
    for batch in source.shard_batches(batch_size):
        z = parts.normalizer.normalize(batch)
        quantized = parts.quantizer(z).quantized
        rectified = parts.rectifier_output(quantized, parts.rectifier)
        sums += torch.stack([(quantized - z).double().square().sum(), (rectified - z).double().square().sum(),
                             torch.tensor(z.numel(), dtype=torch.float64, device=device)])
    parts.rectifier.train()
    ctx.all_reduce_sum_(sums)
    return {"val_quant_mse": (sums[0] / sums[2]).item(), "val_rect_mse": (sums[1] / sums[2]).item()}


# --- resumable state ---------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a checkpoint holds: the trained parts, the optimizer, where the run stands, the RNG."""

    parts: TrainParts
    schedule_epochs: int  # the epochs the learning-rate decay was laid out for (kept when a run is extended)
    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    elapsed_s: float = 0.0  # training, validation and reset time so far

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": self.epoch, "step": self.step, "elapsed_s": self.elapsed_s,
                "schedule_epochs": self.schedule_epochs, "quantizer": self.parts.quantizer.state_dict(),
                "rectifier": self.parts.rectifier.state_dict(), "optimizer": self.parts.optimizer.state_dict(),
                "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.parts.quantizer.load_state_dict(state["quantizer"])
        self.parts.rectifier.load_state_dict(state["rectifier"])
        self.parts.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.elapsed_s = state["epoch"], state["step"], state["elapsed_s"]
        self.schedule_epochs = state["schedule_epochs"]
        torch.set_rng_state(state["rng"]["torch"])
        cuda = state["rng"].get("cuda")
        if torch.cuda.is_available() and cuda is not None and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
