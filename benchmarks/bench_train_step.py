"""Benchmark: nearest-code search and one full training step at the 512T sizes, ours vs a naive baseline.

Sizes: latents 32x8x8, T=512 tokens of d=4, K=16,384 codes per position, rectifier 512x3 (14.07 M).
    (a) search: MultiGroupQuantizer.nearest vs a per-position torch.cdist + argmin loop (how the
        reference does it);
    (b) rectifier: forward + backward of the rectifier alone; ours evaluates diffusers' blocks
        channels-last (EfficientViTRectifier.forward), the baseline through diffusers' own NCHW forward;
    (c) step: quantize + codebook loss + rectifier forward/backward + AdamW on both parameter groups
        (docs/method.md's learning rates and weight decay) with gradient clipping to 1.0 per group.
        Ours: the training loop's own step (stages.train_loop.train_step, fused AdamW); baseline: the
        cdist loop, advanced indexing, diffusers' forward and the default AdamW. Both start from the same
        weights and see the same batch.
Prints samples/s side by side (median over the timed iterations, after warm-up), then the floor this
machine puts under any fp32 implementation of the step: the rectifier's conv/linear FLOPs over the
measured fp32 matmul rate. The defaults keep a run on 2 busy CPU cores near 3 minutes; raise --iters /
--baseline-iters for steadier numbers.

    .venv/bin/python benchmarks/bench_train_step.py [--batch-size 64] [--device auto] [--precision fp32] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.stages.config import load_config
from revq_pipe.pipeline.choices import PRECISIONS
from revq_pipe.stages.distributed import DistContext
from revq_pipe.stages.train_loop import TrainParts, build_optimizer, train_step

PRESET = load_config(Path(__file__).resolve().parents[1] / "configs" / "512T.yaml")  # T=512, K=16,384, 512x3

LATENT_SHAPE = (32, 8, 8)
NUM_TOKENS, CODEBOOK_SIZE = PRESET.quantizer.num_tokens, PRESET.quantizer.codebook_size
EPOCHS, IMAGENET_TRAIN = PRESET.train.epochs, 1_281_167  # docs/method.md's schedule
CODEBOOK_LR, RECTIFIER_LR = PRESET.train.codebook_lr, PRESET.train.rectifier_lr
RECTIFIER_WD, GRAD_CLIP = PRESET.train.rectifier_weight_decay, PRESET.train.grad_clip


def baseline_nearest(tokens: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The naive search: one cdist + argmin per position in a Python loop. (B, T, d), (T, K, d) -> (B, T)."""
    return torch.stack([torch.cdist(tokens[:, t], codebooks[t]).argmin(-1) for t in range(codebooks.shape[0])], 1)


def make_baseline_optimizer(codebooks: torch.nn.Parameter, rectifier: torch.nn.Module) -> torch.optim.AdamW:
    groups = [{"params": [codebooks], "lr": CODEBOOK_LR, "weight_decay": 0.0},
              {"params": list(rectifier.parameters()), "lr": RECTIFIER_LR, "weight_decay": RECTIFIER_WD}]
    return torch.optim.AdamW(groups)


def optimizer_step(optimizer: torch.optim.AdamW, loss: torch.Tensor) -> None:
    """Backward, clip each parameter group separately, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        torch.nn.utils.clip_grad_norm_(group["params"], GRAD_CLIP)
    optimizer.step()


class OurStep:
    """The training loop's own step (stages.train_loop.train_step) on already standardized latents."""

    def __init__(self, quantizer: MultiGroupQuantizer, rectifier: torch.nn.Module, precision: str = "fp32",
                 compile: bool = False) -> None:
        channels = quantizer.latent_shape
        identity = LatentNormalizer(torch.zeros(channels), torch.ones(channels)).to(quantizer.codebooks.device)
        optimizer = build_optimizer(quantizer.codebooks, list(rectifier.parameters()), codebook_lr=CODEBOOK_LR,
                                    codebook_weight_decay=0.0, rectifier_lr=RECTIFIER_LR,
                                    rectifier_weight_decay=RECTIFIER_WD)
        rectify = torch.compile(rectifier) if compile else rectifier  # as train.compile does
        device = quantizer.codebooks.device
        self.parts = TrainParts(normalizer=identity, quantizer=quantizer, rectifier=rectifier, rectify=rectify,
                                optimizer=optimizer, train_rectifier=True, grad_clip=GRAD_CLIP, precision=precision,
                                deferred_search=device.type == "cuda")  # as stages/train.py builds them
        self.ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)

    def __call__(self, z: torch.Tensor) -> None:
        train_step(self.parts, z, self.ctx)


class BaselineStep:
    def __init__(self, codebooks: torch.Tensor, rectifier: torch.nn.Module) -> None:
        self.codebooks = torch.nn.Parameter(codebooks.detach().clone())  # (T, K, d)
        self.rectifier = rectifier
        self.optimizer = make_baseline_optimizer(self.codebooks, rectifier)

    def __call__(self, z: torch.Tensor) -> None:
        tokens = z.reshape(z.shape[0], NUM_TOKENS, -1)  # (B, T, d)
        with torch.no_grad():
            ids = baseline_nearest(tokens, self.codebooks)
        codes = self.codebooks[torch.arange(NUM_TOKENS, device=z.device), ids]  # (B, T, d)
        rectified = self.rectifier.forward_diffusers(codes.detach().reshape(z.shape))
        loss = F.mse_loss(codes, tokens) + F.mse_loss(rectified, z)
        optimizer_step(self.optimizer, loss)


def rectifier_backward(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> None:
    """Forward and backward of the rectifier alone (the gradients accumulate; only the time matters)."""
    F.mse_loss(forward(z), z).backward()


def matmul_flops(model: torch.nn.Module, rows: int) -> int:
    """Forward FLOPs of every conv and linear layer over `rows` = B*H*W positions (same padding)."""
    flops = 0
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            flops += 2 * rows * layer.in_features * layer.out_features
        elif isinstance(layer, torch.nn.Conv2d):
            taps = layer.kernel_size[0] * layer.kernel_size[1]
            flops += 2 * rows * layer.in_channels // layer.groups * layer.out_channels * taps
    return flops


def matmul_rate(rows: int, width: int, device: torch.device) -> float:
    """Best fp32 FLOP/s of a (rows, width) x (width, 4 width) matmul, the rectifier's largest layer shape."""
    a = torch.randn(rows, width, device=device)
    b = torch.randn(width, 4 * width, device=device)
    best = min(timed(lambda: a @ b, 8, device)[2:])
    return 2 * rows * width * 4 * width / best


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of `iters` calls, synchronizing the device around each."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def timed_pair(ours: Callable[[], object], base: Callable[[], object], ours_iters: int, base_iters: int,
               device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds per call of both, interleaved call by call so that a change in machine load hits both alike."""
    ours_times, base_times = [], []
    for i in range(max(ours_iters, base_iters)):
        if i < ours_iters:
            ours_times += timed(ours, 1, device)
        if i < base_iters:
            base_times += timed(base, 1, device)
    return ours_times, base_times


def report(name: str, batch: int, ours: list[float], base: list[float]) -> None:
    ours_rate, base_rate = batch / statistics.median(ours), batch / statistics.median(base)
    print(f"{name:<8}{ours_rate:>14,.1f}{base_rate:>14,.1f}{ours_rate / base_rate:>10.1f}x   "
          f"(s/iter ours {' '.join(f'{t:.2f}' for t in ours)} | baseline {' '.join(f'{t:.2f}' for t in base)})",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--iters", type=int, default=3, help="timed calls of ours in each section")
    parser.add_argument("--baseline-iters", type=int, default=2,
                        help="timed searches and steps of the baseline (its rectifier: --iters)")
    parser.add_argument("--search-memory-mb", type=float, default=0, help="0 = derived from the device")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="our step's precision policy (pipeline/precision.py); the baseline runs in fp32")
    parser.add_argument("--compile", action="store_true", help="our step with the rectifier under torch.compile")
    args = parser.parse_args()

    # --- setup: identical weights and batch for both -------------------------------------------
    device = resolve_device(args.device)
    batch = args.batch_size
    torch.manual_seed(0)
    quantizer = MultiGroupQuantizer(LATENT_SHAPE, NUM_TOKENS, CODEBOOK_SIZE,
                                    search_memory_mb=args.search_memory_mb).to(device)
    rectifier = build_rectifier(PRESET.rectifier, LATENT_SHAPE[0]).to(device)
    with torch.no_grad():  # a rectifier that is not the identity, so every layer gets gradients
        rectifier.conv_out.weight.normal_(0.0, 1e-3)
    z = torch.randn(batch, *LATENT_SHAPE, device=device)  # standardized latents
    tokens = quantizer.to_tokens(z)
    ours = OurStep(quantizer, rectifier, precision=args.precision, compile=args.compile)
    base = BaselineStep(quantizer.codebooks, copy.deepcopy(rectifier))
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}, torch {torch.__version__}, batch {batch}, T={NUM_TOKENS} d={quantizer.token_dim}"
          f" K={CODEBOOK_SIZE}, rectifier 512x3 ({sum(p.numel() for p in rectifier.parameters()) / 1e6:.2f} M)")
    print(f"ours: nearest() (search plan {quantizer.search_plan(batch)}) and train_loop.train_step with fused AdamW"
          f" (precision {args.precision}, compile {args.compile}; the rectify row is fp32 eager); "
          "baseline: per-position cdist + argmin loop, diffusers' forward, default AdamW")
    print(f"{'':<8}{'ours/s':>14}{'baseline/s':>14}{'speedup':>11}")

    # --- (a) search alone ---------------------------------------------------------------------
    expected = quantizer.nearest(tokens)  # warm-up
    baseline_nearest(tokens[:, :32], quantizer.codebooks.detach()[:32])  # warm-up (a slice: it is slow)
    ours_search, base_search = timed_pair(lambda: quantizer.nearest(tokens),
                                          lambda: baseline_nearest(tokens, quantizer.codebooks.detach()),
                                          args.iters, args.baseline_iters, device)
    mismatches = int((baseline_nearest(tokens[:, :64], quantizer.codebooks.detach()[:64]) != expected[:, :64]).sum())
    report("search", batch, ours_search, base_search)

    # --- (b) rectifier forward + backward alone ---------------------------------------------
    reference_rectifier = base.rectifier
    rectifier_backward(rectifier, z)  # warm-up at full size: the allocator's first large buffers are slow
    rectifier_backward(reference_rectifier.forward_diffusers, z)
    ours_rect, base_rect = timed_pair(lambda: rectifier_backward(rectifier, z),
                                      lambda: rectifier_backward(reference_rectifier.forward_diffusers, z),
                                      args.iters, args.iters, device)
    report("rectify", batch, ours_rect, base_rect)

    # --- (c) full training step ---------------------------------------------------------------
    ours(z)  # warm-up for both: optimizer state, allocator
    base(z)
    ours_step, base_step = timed_pair(lambda: ours(z), lambda: base(z), args.iters, args.baseline_iters, device)
    report("step", batch, ours_step, base_step)
    rest = statistics.median(ours_step) - statistics.median(ours_search)
    print(f"ours step = search {statistics.median(ours_search):.2f} s + rest (codebook loss, rectifier fwd/bwd, "
          f"AdamW) {rest:.2f} s per batch; baseline ids that differ from ours on 64 positions: {mismatches} "
          "(cdist's float32 matmul form can round near ties the other way)")
    hours = EPOCHS * IMAGENET_TRAIN / (batch / statistics.median(ours_step)) / 3600
    print(f"at our step rate, {EPOCHS} epochs of 512T over the {IMAGENET_TRAIN:,} ImageNet train latents take "
          f"{hours:,.1f} h on this device (batch {batch}; the target on one H100: under 2 h)")

    # --- the floor: the rectifier's matmul work at this machine's fp32 matmul rate ---------------
    rows = batch * LATENT_SHAPE[1] * LATENT_SHAPE[2]
    work = 3 * matmul_flops(rectifier, rows)  # backward = gradients of inputs and of weights, 2x forward
    rate = matmul_rate(rows, PRESET.rectifier.width, device)
    print(f"floor: the rectifier's convs and linears take {work / 1e9:.0f} GFLOP per batch forward+backward; "
          f"fp32 matmul here peaks at {rate / 1e9:.0f} GFLOP/s, so no fp32 implementation of this step runs "
          f"faster than {work / rate:.2f} s per batch ({batch * rate / work:.1f} samples/s) on this device")


if __name__ == "__main__":
    main()
