"""Pieces of stage two: the learning-rate schedule, the trained parts and their state, one training epoch,
validation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from revq_pipe.cache.loader import LatentSource
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.precision import rectifier_autocast
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
        rates = dict(zip(("codebooks", "rectifier"), self.rates(epoch, step)))
        for group in optimizer.param_groups:  # a frozen part has no group
            group["lr"] = rates[group["name"]]


# --- one epoch --------------------------------------------------------------------------------


@dataclass
class TrainParts:
    """The trained modules with what the loop needs around them."""

    normalizer: LatentNormalizer
    quantizer: MultiGroupQuantizer
    rectifier: torch.nn.Module  # the bare module (saved, validated)
    rectify: Callable[[torch.Tensor], torch.Tensor]  # DDP / compiled wrapper used for training
    optimizer: torch.optim.Optimizer
    train_rectifier: bool  # False for kind "none" (identity: no loss, no parameters) or a frozen rectifier
    grad_clip: float
    precision: str  # pipeline/precision.py policy: "fp32", "tf32" or "bf16" (the rectifier under autocast)
    deferred_search: bool = False  # ask the search for a deferred exactness check (no host sync; accelerators)
    train_codebooks: bool = True  # False: the codebooks stay as they are (fine-tuning the rectifier alone)
    has_rectifier: bool = True  # False for kind "none"; a frozen rectifier still rectifies
    usage: CodeUsage = field(init=False)  # code usage of the running epoch (the non-activation reset's input)
    rect_params: list[torch.nn.Parameter] = field(init=False)  # clipped as one group every step
    searches_repeated: int = field(init=False, default=0)  # steps whose deferred check failed (this epoch)

    def __post_init__(self) -> None:
        q = self.quantizer
        self.rect_params = [p for p in self.rectifier.parameters() if p.requires_grad]
        self.usage = CodeUsage(q.num_tokens, q.codebook_size, q.codebooks.device)

    def rectifier_output(self, quantized: torch.Tensor, module: Callable) -> torch.Tensor:
        with rectifier_autocast(self.precision, quantized.device):
            return module(quantized).float()


class NonFiniteLossError(ValueError):
    """Training produced a NaN or infinite loss."""


def build_optimizer(codebooks: torch.nn.Parameter | None, rect_params: list[torch.nn.Parameter], *,
                    codebook_lr: float, codebook_weight_decay: float, rectifier_lr: float,
                    rectifier_weight_decay: float) -> torch.optim.AdamW:
    """AdamW with a group named "codebooks" and one named "rectifier", each only when it is trained.

    The fused implementation steps all parameters in one kernel (benchmarks/bench_train_step.py).
    """
    groups = []
    if codebooks is not None:
        groups.append({"name": "codebooks", "params": [codebooks], "lr": codebook_lr,
                       "weight_decay": codebook_weight_decay})
    if rect_params:
        groups.append({"name": "rectifier", "params": rect_params, "lr": rectifier_lr,
                       "weight_decay": rectifier_weight_decay})
    if not groups:
        raise ValueError("nothing to train: the codebooks are frozen and there is no rectifier to train; train "
                         "the codebooks, the rectifier, or both")
    return torch.optim.AdamW(groups, fused=True)


def train_step(parts: TrainParts, batch: torch.Tensor, ctx: DistContext
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's slice (b, C, H, W) of a global batch of b x world_size raw latents;
    returns (loss, quant MSE, rect MSE) of the slice, detached.

    The codebook gradient is the same function of the whole global batch on every number of ranks: each
    rank's per-token gradients are normalised by the global batch and the ranks exchange only what the
    batch touched (`codebook_gradient`); DDP averages the rectifier's.
    """
    q = parts.quantizer
    z = parts.normalizer.normalize(batch)  # (b, C, H, W) standardized
    tokens = q.to_tokens(z)  # (b, T, d)
    if parts.deferred_search:
        ids, check = q.nearest(tokens, deferred=True)
        check.combine(ctx.all_reduce_sum_).start_copy()  # read below, once the step's work is queued
    else:
        ids, check = q.nearest(tokens), None
    codes, quant_mse, rect_mse = _forward_backward(parts, z, tokens, ids, ctx.world_size)
    if check is not None and not check.holds():  # all ranks agree (combined): all of them repeat the step
        parts.searches_repeated += 1
        ids = q.nearest(tokens)
        codes, quant_mse, rect_mse = _forward_backward(parts, z, tokens, ids, ctx.world_size)
    parts.usage.add(ids)
    if parts.train_codebooks:
        q.codebooks.grad = codebook_gradient(q, ids, codes.grad, ctx)
    if parts.grad_clip > 0:  # clipped separately for codebooks and rectifier, as the reference does
        if parts.train_codebooks:
            torch.nn.utils.clip_grad_norm_([q.codebooks], parts.grad_clip)
        if parts.train_rectifier:
            torch.nn.utils.clip_grad_norm_(parts.rect_params, parts.grad_clip)
    parts.optimizer.step()
    return quant_mse + rect_mse, quant_mse, rect_mse


def _forward_backward(parts: TrainParts, z: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor,
                      world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Losses and backward for one slice; returns (codes (b, T, d) holding the per-token codebook gradient,
    quant MSE, rect MSE) of the slice."""
    q = parts.quantizer
    parts.optimizer.zero_grad(set_to_none=True)
    # the selected codes as a leaf: their gradient is what each token contributes to its code's gradient
    codes = q.lookup(ids).detach().requires_grad_(parts.train_codebooks)  # (b, T, d)
    # normalised by the global batch, so that a token's gradient is the same on every number of ranks
    codebook_loss = F.mse_loss(codes, tokens, reduction="sum") / (tokens.numel() * world_size)
    quant_mse = codebook_loss.detach() * world_size
    losses = [codebook_loss] if parts.train_codebooks else []
    if parts.train_rectifier:
        rect_mse = F.mse_loss(parts.rectifier_output(q.from_tokens(codes.detach()), parts.rectify), z)
        losses.append(rect_mse)
    elif parts.has_rectifier:  # frozen: it still rectifies, and its error is what the codebooks are judged by
        with torch.no_grad():
            rect_mse = F.mse_loss(parts.rectifier_output(q.from_tokens(codes.detach()), parts.rectifier), z)
    else:  # the identity rectifier: its MSE is the quantization MSE
        rect_mse = quant_mse
    sum(losses).backward()
    return codes, quant_mse, rect_mse.detach()


def codebook_gradient(quantizer: MultiGroupQuantizer, ids: torch.Tensor, code_grads: torch.Tensor,
                      ctx: DistContext) -> torch.Tensor:
    """The codebooks' gradient (T, K, d) from every rank's ids (b, T) and per-token gradients (b, T, d).

    The ranks all-gather what the global batch touched, (id, gradient) for each of its B x T tokens, in
    rank order (= global batch order), and every rank sums it into codes with the same kernel as an
    embedding's backward: identical on every rank and for any number of ranks, at
    B x T x (d + 1) x 4 bytes per step instead of the dense T x K x d all-reduce (benchmarks/bench_sync.py).
    """
    if ctx.is_distributed:
        ids = ctx.all_gather_cat(ids.to(torch.int32))  # (B, T)
        code_grads = ctx.all_gather_cat(code_grads)  # (B, T, d)
    t, k, d = quantizer.codebooks.shape
    flat = (ids.long() + torch.arange(t, device=ids.device) * k).view(-1)  # (B*T,) rows of the (T*K, d) view
    grad = torch.ops.aten.embedding_dense_backward(code_grads.reshape(-1, d), flat, t * k, -1, False)
    return grad.view(t, k, d)


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
            rate = window[2].item() * batch.shape[0] * ctx.world_size / max(now - last, 1e-9)  # global samples/s
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
    """Quantization and rectified MSE (standardized space) and code usage on the whole validation split."""
    q = parts.quantizer
    device = q.codebooks.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # quant SSE, rect SSE, elements
    usage = CodeUsage(q.num_tokens, q.codebook_size, device)
    parts.rectifier.eval()
    for batch in source.shard_batches(batch_size):
        z = parts.normalizer.normalize(batch)
        out = q(z)
        usage.add(out.ids)
        rectified = parts.rectifier_output(out.quantized, parts.rectifier)
        sums += torch.stack([(out.quantized - z).double().square().sum(), (rectified - z).double().square().sum(),
                             torch.tensor(z.numel(), dtype=torch.float64, device=device)])
    parts.rectifier.train()
    ctx.all_reduce_sum_(sums)
    ctx.all_reduce_sum_(usage.counts)
    seen = usage.summary()
    return {"val_quant_mse": (sums[0] / sums[2]).item(), "val_rect_mse": (sums[1] / sums[2]).item(),
            "val_codebook_usage": seen["codebook_usage"], "val_dead_codes": seen["dead_codes"]}


# --- the rectifier's gate ------------------------------------------------------------------------


GATE_CONFIDENCE = 2.0  # z-score: the held-out gain must be this many standard errors above zero
GATE_MAX, GATE_GRID = 2.0, 401  # candidate gates: GATE_GRID evenly spaced in [0, GATE_MAX]


@torch.no_grad()
def fit_gate(parts: TrainParts, holdout: LatentSource, batch_size: int, ctx: DistContext) -> dict[str, float]:
    """Fit the rectifier's gate g (pipeline/rectifier.py) on held-out training latents and set it.

    With q the quantized latent, d the rectifier's correction and z the clean latent, what the gate gains
    on latent i is G_i(g) = |z_i - q_i|^2 - |z_i - q_i - g d_i|^2 = 2 g a_i - g^2 l_i (a_i = <z_i - q_i, d_i>,
    l_i = |d_i|^2). g is the candidate in [0, GATE_MAX] with the largest mean gain over the held-out latents among
    those whose gain is GATE_CONFIDENCE standard errors above zero; g = 0 (the quantized latent itself)
    always qualifies. So on the held-out latents the rectified error is never above the quantized one, and
    a gain too small to tell from noise there is not taken: on other unseen latents (the validation split)
    a rectifier that does not help yet stays out of the way. Returns g and both held-out errors.
    """
    device = parts.quantizer.codebooks.device
    moments = torch.zeros(7, dtype=torch.float64, device=device)  # n, Σa, Σl, Σa², Σl², Σal, Σ|z-q|²
    parts.rectifier.eval()
    for batch in holdout.shard_batches(batch_size):
        z = parts.normalizer.normalize(batch)
        quantized = parts.quantizer(z).quantized
        residual = (z - quantized).double()
        correction = parts.rectifier_output(quantized, parts.rectifier.correction).double()
        a, l = (residual * correction).sum((1, 2, 3)), correction.square().sum((1, 2, 3))  # (b,) per latent
        moments += torch.stack([torch.tensor(float(len(a)), dtype=torch.float64, device=device), a.sum(), l.sum(),
                                a.square().sum(), l.square().sum(), (a * l).sum(), residual.square().sum()])
    parts.rectifier.train()
    n, sa, sl, saa, sll, sal, quant_sse = ctx.all_reduce_sum_(moments).tolist()
    gate = _best_confident_gate(n, sa, sl, saa, sll, sal)
    parts.rectifier.residual_gate.fill_(gate)
    rect_sse = quant_sse - 2 * gate * sa + gate * gate * sl
    values = n * math.prod(holdout.cache.latent_shape)
    return {"gate": gate, "holdout_quant_mse": quant_sse / values, "holdout_rect_mse": rect_sse / values}


def _best_confident_gate(n: float, sa: float, sl: float, saa: float, sll: float, sal: float) -> float:
    """The g of fit_gate from the per-latent moments: n, the sums of a, l, a^2, l^2 and a l."""
    g = torch.linspace(0.0, GATE_MAX, GATE_GRID, dtype=torch.float64)
    mean = (2 * g * sa - g ** 2 * sl) / n  # mean gain per latent
    second = (4 * g ** 2 * saa - 4 * g ** 3 * sal + g ** 4 * sll) / n  # mean squared gain per latent
    spread = (second - mean ** 2).clamp_min(0).sqrt()
    confident = mean - GATE_CONFIDENCE * spread / max(n, 1.0) ** 0.5 > 0
    confident[0] = True  # g = 0 gains nothing and risks nothing
    return float(g[confident][mean[confident].argmax()])


# --- resumable state ---------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a checkpoint holds: the trained parts, the optimizer, where the run stands, the RNG."""

    parts: TrainParts
    schedule_epochs: int  # the epochs the learning-rate decay was laid out for (kept when a run is extended)
    data: dict[str, Any] = field(default_factory=dict)  # what identifies the training data (checked on resume)
    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    elapsed_s: float = 0.0  # training, validation and reset time so far

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": self.epoch, "step": self.step, "elapsed_s": self.elapsed_s,
                "schedule_epochs": self.schedule_epochs, "data": self.data, "quantizer": self.parts.quantizer.state_dict(),
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
