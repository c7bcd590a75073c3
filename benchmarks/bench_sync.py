"""Codebook gradient synchronisation across ranks, ours (sparse exchange) vs the dense all-reduce, side by side.

    .venv/bin/python benchmarks/bench_sync.py [--ranks 8] [--batch 256] [--measure 512T,256T-B] [--repeats 5]

Part 1 prints, for the three ImageNet presets, the bytes each rank sends per training step to keep the
codebooks identical: ours all-gathers the (id, gradient) pair of every token the global batch touched
(stages/train_loop.codebook_gradient: B x T x (d + 1) x 4 bytes in all, each rank sending its own part
to the W - 1 others, ring all-gather: (W - 1) / W of it), the baseline all-reduces the dense (T, K, d)
gradient (ring all-reduce: 2 (W - 1) / W of it per rank).

Part 2 measures both on this machine with 2 gloo ranks (processes started as torchrun would), for the
presets named by --measure: per step, each rank computes its tokens' gradients (its share of the global
batch), then either exchanges them sparsely and assembles the dense gradient, or assembles its own dense
gradient and all-reduces it. Both end with the same gradient on every rank (checked). Times are the
median over --repeats steps, rank 0's wall clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from revq_pipe.stages.config import load_config  # noqa: E402

PRESETS = ("512T", "256T-B", "256T-L")
TOKENS_PER_LATENT = 32 * 8 * 8  # C*H*W of DC-AE f32c32 at 256x256


def geometry(preset: str) -> tuple[int, int, int]:
    """(T, K, d) of a preset."""
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    t, k = cfg.quantizer.num_tokens, cfg.quantizer.codebook_size
    return t, k, TOKENS_PER_LATENT // t


def bytes_table(ranks: int, batch: int) -> None:
    print(f"part 1: bytes each rank sends per step, {ranks} ranks, global batch {batch}")
    print(f"{'preset':<8}{'T x K x d':>22}{'dense gradient':>16}{'ours (sparse)':>16}{'dense all-reduce':>18}"
          f"{'ratio':>9}")
    for preset in PRESETS:
        t, k, d = geometry(preset)
        dense = t * k * d * 4
        sparse_total = batch * t * (d + 1) * 4  # int32 id + d float32 gradient values per token
        ours = (ranks - 1) / ranks * sparse_total
        baseline = 2 * (ranks - 1) / ranks * dense
        print(f"{preset:<8}{f'{t} x {k:,} x {d}':>22}{dense / 2**20:>12,.0f} MiB{ours / 2**20:>12.2f} MiB"
              f"{baseline / 2**20:>14,.0f} MiB{baseline / ours:>8,.0f}x")


def rank_main(args: argparse.Namespace) -> None:
    """One rank of part 2: time both synchronisations per preset; rank 0 prints."""
    from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
    from revq_pipe.stages.distributed import distributed
    from revq_pipe.stages.train_loop import codebook_gradient

    with distributed("cpu") as ctx:
        for preset in args.measure.split(","):
            t, k, d = geometry(preset)
            quantizer = MultiGroupQuantizer((32, 8, 8), t, k)
            share = args.batch // ctx.world_size
            generator = torch.Generator().manual_seed(ctx.rank)
            ids = torch.randint(0, k, (share, t), generator=generator)
            grads = torch.randn(share, t, d, generator=generator) / (args.batch * t * d)
            flat = (ids + torch.arange(t) * k).view(-1)
            times = {"ours": [], "dense": []}
            for repeat in range(args.repeats + 1):  # the first is a warm-up
                ctx.barrier()
                start = time.perf_counter()
                ours = codebook_gradient(quantizer, ids, grads, ctx)
                ctx.barrier()
                middle = time.perf_counter()
                dense = torch.ops.aten.embedding_dense_backward(grads.reshape(-1, d), flat, t * k, -1, False)
                ctx.all_reduce_sum_(dense)
                ctx.barrier()
                end = time.perf_counter()
                if repeat:
                    times["ours"].append(middle - start)
                    times["dense"].append(end - middle)
            same = torch.allclose(ours.view(-1, d), dense, rtol=1e-5, atol=1e-12)
            del dense, ours
            if ctx.is_main:
                print(f"{preset:<8}{statistics.median(times['ours']) * 1e3:>12.1f} ms"
                      f"{statistics.median(times['dense']) * 1e3:>14.1f} ms"
                      f"{statistics.median(times['dense']) / statistics.median(times['ours']):>9.1f}x"
                      f"   same gradient: {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8, help="ranks for the bytes table")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--measure", default="512T,256T-B", help="presets to time with 2 gloo ranks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_main(args)
        return
    bytes_table(args.ranks, args.batch)
    print(f"\npart 2: measured per step, 2 gloo ranks on this machine ({os.cpu_count()} cores), global batch "
          f"{args.batch}")
    print(f"{'preset':<8}{'ours (sparse)':>15}{'dense all-reduce':>17}{'ratio':>10}")
    from tests.helpers_processes import run_ranks

    command = [sys.executable, __file__, "--rank-worker", "--batch", str(args.batch), "--measure", args.measure,
               "--repeats", str(args.repeats)]
    done = run_ranks(command, {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, 2,
                     timeout=1800, cwd=REPO)
    print(done.stdout.split("[rank 1]")[0].replace("[rank 0]\n", ""), end="")
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        sys.exit(done.returncode)


if __name__ == "__main__":
    main()
