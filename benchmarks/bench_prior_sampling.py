"""Benchmark: sampling from the token prior with the KV cache (ours) vs recomputing the whole prefix every step.

Both sample the same sequences: TokenPrior.generate with use_cache=True keeps every layer's keys and
values and runs one position per step; use_cache=False runs the transformer over the whole prefix at
every step, as a model without a cache must (so its cost grows with the square of the length). The two
alternate call by call with the same seed, and the ids they produce are checked to be identical. The
weights are random (speed does not depend on them); the shapes default to the demo prior
(configs/prior-demo.yaml) over the demo tokenizer's T = 256 positions of K = 256 codes, with
classifier-free guidance (two sequences per sample, as `prior sample` runs).

    .venv/bin/python benchmarks/bench_prior_sampling.py [--preset prior-demo] [--tokens 256] [--codebook 256]
        [--classes 8] [--batch 16] [--repeats 3] [--cfg 2.0] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.prior import PriorSpec, TokenPrior
from revq_pipe.stages.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LATENT_VALUES = 32 * 8 * 8  # a token of T positions has d = 2048 / T values (DC-AE f32c32 latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="prior-demo", help="prior preset whose width, depth, heads, code width")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="samples per generate call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg", type=float, default=2.0, help="guidance scale (1.0 = one sequence per sample)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pc = load_config(CONFIGS / f"{args.preset}.yaml").prior
    device = resolve_device(args.device)
    spec = PriorSpec(num_tokens=args.tokens, codebook_size=args.codebook, token_dim=LATENT_VALUES // args.tokens,
                     num_classes=args.classes, width=pc.width, depth=pc.depth, heads=pc.heads, code_width=pc.code_width)
    torch.manual_seed(0)
    prior = TokenPrior(spec, torch.randn(spec.num_tokens, spec.codebook_size, spec.token_dim)).to(device).eval()
    classes = torch.arange(args.batch, device=device) % args.classes
    print(f"prior {args.preset}: width {spec.width}, {spec.depth} blocks, {spec.heads} heads, code width "
          f"{spec.code_width}; T={spec.num_tokens}, K={spec.codebook_size}; batch {args.batch}, cfg {args.cfg:g}, "
          f"device {device}, {torch.get_num_threads()} threads")

    def sample(use_cache: bool) -> tuple[torch.Tensor, float]:
        generator = torch.Generator(device).manual_seed(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ids = prior.generate(classes, cfg_scale=args.cfg, generator=generator, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return ids, time.perf_counter() - start

    sample(True)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        outputs = {}
        for use_cache in (True, False):
            outputs[use_cache], seconds = sample(use_cache)
            times[use_cache].append(seconds)
        if not torch.equal(outputs[True], outputs[False]):
            raise SystemExit("the cached and the recomputed samples differ: the KV cache is wrong")

    tokens = args.batch * spec.num_tokens
    print(f"{'':28s} {'KV cache (ours)':>24s} {'recompute the prefix':>24s}")
    for label, unit in (("tokens/s, median (min-max)", "rate"), ("seconds per call", "time")):
        cells = []
        for use_cache in (True, False):
            values = [tokens / t for t in times[use_cache]] if unit == "rate" else times[use_cache]
            cells.append(f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})")
        print(f"{label:28s} {cells[0]:>24s} {cells[1]:>24s}")
    speedup = statistics.median(times[False]) / statistics.median(times[True])
    print(f"speed-up of the cache: {speedup:.1f}x; identical ids in all {args.repeats} repeats")


if __name__ == "__main__":
    main()
