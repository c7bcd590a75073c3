"""Pieces of stage two: where the latents live, one training epoch, validation, usage counting."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext

# Independent random streams derived from (seed, stream, epoch): each is reproducible on its own,
# so resuming at an epoch boundary replays exactly what an uninterrupted run would have done.
INIT_STREAM, SHUFFLE_STREAM, RESET_STREAM = 0, 1, 2
_RESIDENT_FRACTION = 0.5  # "auto" keeps a split resident when it takes at most this share of free memory


def derived_generator(seed: int, stream: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, epoch), identical on every rank."""
    words = np.random.SeedSequence([seed % 2**63, stream, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def lr_factor(epoch: int, epochs: int, final_fraction: float) -> float:
    """Exponential decay once per epoch: 1 at epoch 0, final_fraction at the last epoch."""
    if epochs <= 1:
        return 1.0
    return final_fraction ** (epoch / (epochs - 1))


# --- data -------------------------------------------------------------------------------------


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LatentSource:
    """One split's raw latents: resident on the training device when it fits, else streamed from Zarr.

    Args:
        cache: the opened split.
        device: the training device.
        policy: "auto" (resident when it takes at most half the free memory), "always" or "never".
    """

    def __init__(self, cache: LatentCache, device: torch.device, policy: str) -> None:
        self.cache = cache
        self.device = device
        self.num_samples = cache.num_samples
        itemsize = 2 if cache.manifest.latent_dtype == "float16" else 4
        self.nbytes = self.num_samples * int(np.prod(cache.latent_shape)) * itemsize
        self.resident = policy == "always" or (
            policy == "auto" and self.nbytes <= _RESIDENT_FRACTION * _free_bytes(device))
        # kept in the stored dtype (float16 halves the footprint); batches are cast to float32
        self.data = cache.load_latents(device) if self.resident else None  # (N, C, H, W)

    def describe(self) -> str:
        where = f"resident on {self.device}" if self.resident else "streamed from Zarr"
        return f"{self.cache.path}: {self.num_samples} latents {tuple(self.cache.latent_shape)}, " \
               f"{self.nbytes / 2**20:,.1f} MiB, {where}"

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        """Full batches per rank per epoch; the same on every rank (the remainder is dropped)."""
        return self.num_samples // world_size // batch_size

    def epoch_batches(self, batch_size: int, *, seed: int, epoch: int,
                      ctx: DistContext) -> Iterator[torch.Tensor]:
        """This rank's shuffled float32 batches (B, C, H, W) of one epoch, on the device."""
        steps = self.steps_per_epoch(batch_size, ctx.world_size)
        if not self.resident:
            stream = self.cache.iter_batches(batch_size, seed=seed, epoch=epoch, shuffle=True,
                                             rank=ctx.rank, world_size=ctx.world_size, drop_last=True)
            for _, batch in zip(range(steps), stream):
                yield batch.to(self.device, non_blocking=True)
            return
        order = torch.randperm(self.num_samples, generator=derived_generator(seed, SHUFFLE_STREAM, epoch))
        mine = order[ctx.rank * steps * batch_size:(ctx.rank + 1) * steps * batch_size].to(self.device)
        for index in mine.view(steps, batch_size):
            yield self.data[index].float()

    def shard_batches(self, batch_size: int, ctx: DistContext) -> Iterator[torch.Tensor]:
        """This rank's contiguous slice of the split in storage order (for validation), all samples."""
        if not self.resident:
            yield from (b.to(self.device) for b in self.cache.iter_batches(
                batch_size, seed=0, epoch=0, shuffle=False, rank=ctx.rank, world_size=ctx.world_size))
            return
        lo = ctx.rank * self.num_samples // ctx.world_size
        hi = (ctx.rank + 1) * self.num_samples // ctx.world_size
        for start in range(lo, hi, batch_size):
            yield self.data[start:min(start + batch_size, hi)].float()

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` distinct latents (float32, on the device), drawn without replacement."""
        if self.resident:
            return self.data[torch.randperm(self.num_samples, generator=generator)[:count].to(self.device)].float()
        # streaming: the first `count` latents of a shuffled pass (chunks in random order)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        taken, parts = 0, []
        for batch in self.cache.iter_batches(min(count, 4096), seed=seed, epoch=0, shuffle=True):
            parts.append(batch[:count - taken])
            taken += len(parts[-1])
            if taken >= count:
                break
        return torch.cat(parts).to(self.device)


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
    counts: torch.Tensor = field(init=False)  # (T, K) int64 code usage of the running epoch
    rect_params: list[torch.nn.Parameter] = field(init=False)  # clipped as one group every step

    def __post_init__(self) -> None:
        q = self.quantizer
        self.rect_params = [p for p in self.rectifier.parameters() if p.requires_grad]
        self.counts = torch.zeros(q.num_tokens, q.codebook_size, dtype=torch.int64, device=q.codebooks.device)
        self._offsets = torch.arange(q.num_tokens, device=q.codebooks.device) * q.codebook_size  # (T,)

    def count_usage(self, ids: torch.Tensor) -> None:
        """Add one use per (position, id) in ids (B, T)."""
        flat = (ids + self._offsets).reshape(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

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
    parts.count_usage(out.ids)
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


def train_epoch(parts: TrainParts, batches: Iterator[torch.Tensor], *, epoch: int, step: int,
                ctx: DistContext, log_every: int, log_prefix: str) -> dict[str, float]:
    """One pass over this rank's batches; returns the epoch's mean MSEs (all ranks) and step/sample counts."""
    device = parts.quantizer.codebooks.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # quant MSE, rect MSE summed over steps
    window = torch.zeros(3, dtype=torch.float64, device=device)  # the same + steps since the last log line
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
    steps = samples = 0
    start = last = time.perf_counter()
    for batch in batches:
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
            log(f"{log_prefix} step {step} loss {quant + rect:.5f} quant_mse {quant:.5f} rect_mse {rect:.5f} "
                f"{rate:,.0f} samples/s{_memory_note(device)}")
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
    for batch in source.shard_batches(batch_size, ctx):
        z = parts.normalizer.normalize(batch)
        quantized = parts.quantizer(z).quantized
        rectified = parts.rectifier_output(quantized, parts.rectifier)
        sums += torch.stack([(quantized - z).double().square().sum(), (rectified - z).double().square().sum(),
                             torch.tensor(z.numel(), dtype=torch.float64, device=device)])
    parts.rectifier.train()
    ctx.all_reduce_sum_(sums)
    return {"val_quant_mse": (sums[0] / sums[2]).item(), "val_rect_mse": (sums[1] / sums[2]).item()}
