"""Stage one's store assembly and stage two's data loading at scale, 1 rank vs 2 ranks, next to the timeout.

    .venv/bin/python benchmarks/bench_scale.py [--samples 131072] [--batch 256] [--timeout-minutes 60]

Stages N synthetic 32x8x8 latents as a cache writer's units (float16, 256-row units, as `revq-pipe encode`
leaves them), then times, on 1 rank and on 2 gloo ranks (processes started as torchrun would):

- finalize: assembling the Zarr store from the staged units (every rank summarizes a share of the units,
  then writes a share of the chunks; rank 0 writes statistics and manifest), and checks that both stores
  are the same bytes;
- load: a split read whole into memory (`LatentSource` resident; every rank loads all of it);
- stream: one epoch of global batches streamed from the store (`LatentSource` streamed; each rank reads its
  share of every batch, one shuffle window at a time, the next one in the background).

Each phase is printed per 100,000 latents and extrapolated linearly to ImageNet's 1,281,167 and to 10 M
latents, next to dist.timeout_minutes: a phase that runs inside a collective must stay well below it.
On this 2-core machine the 2 ranks share the cores, so 2 ranks cannot be faster than 1 here; what the
2-rank column shows is that the work is divided (each rank's share) and that nothing waits on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = (32, 8, 8)
UNIT = 256
SPEC = dict(latent_shape=SHAPE, split="train", image_recipe={"resolution": 256}, source=None,
            vae_identity={"source": "synthetic", "class": "AutoencoderDC", "weights_sha256": "0" * 64},
            chunk_size=UNIT)


def stage(path: Path, n: int) -> float:
    """Write n synthetic latents as staged units (phase one); returns seconds."""
    from revq_pipe.cache.writer import CacheWriter

    start = time.perf_counter()
    writer = CacheWriter.open(path, num_inputs=n, **SPEC)
    rng = np.random.default_rng(0)
    offsets, scales = rng.normal(0, 1, SHAPE), np.exp(rng.normal(0, 0.5, SHAPE))
    for u in range(writer.num_units):
        lo, hi = writer.unit_range(u)
        latents = (offsets + scales * rng.standard_normal((hi - lo, *SHAPE))).astype(np.float32)
        writer.write_unit(u, latents, np.zeros(hi - lo, dtype=np.int64), [f"{i:08d}" for i in range(lo, hi)])
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    """One rank: time its part of args.phase and print one JSON line."""
    import torch

    from revq_pipe.cache.loader import LatentSource
    from revq_pipe.cache.reader import LatentCache
    from revq_pipe.cache.writer import CacheWriter
    from revq_pipe.stages.distributed import distributed

    with distributed("cpu") as ctx:
        ctx.barrier()
        start = time.perf_counter()
        if args.phase == "finalize":
            CacheWriter.open(args.store, num_inputs=args.samples, create=False, **SPEC).finalize(collective=ctx)
        else:
            cache = LatentCache.open(args.store)
            source = LatentSource(cache, torch.device("cpu"), "always" if args.phase == "load" else "never",
                                  rank=ctx.rank, world_size=ctx.world_size, shuffle_window=65536)
            if args.phase == "stream":
                for _ in source.epoch_batches(args.batch, seed=0, epoch=0):
                    pass
        mine = time.perf_counter() - start
        ctx.barrier()
        print(json.dumps({"rank": ctx.rank, "seconds": mine, "phase_seconds": time.perf_counter() - start}))


def run_phase(phase: str, store: Path, ranks: int, args: argparse.Namespace) -> dict:
    from tests.helpers_processes import run_ranks

    command = [sys.executable, __file__, "--worker", "--phase", phase, "--store", str(store),
               "--samples", str(args.samples), "--batch", str(args.batch)]
    done = run_ranks(command, {**os.environ, "PYTHONPATH": str(REPO)}, ranks, timeout=3600, cwd=REPO)
    if done.returncode:
        sys.exit(f"{phase} on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"phase": max(r["phase_seconds"] for r in lines), "ranks": [r["seconds"] for r in lines]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=256, help="global batch of the streamed epoch")
    parser.add_argument("--timeout-minutes", type=float, default=60.0, help="dist.timeout_minutes to compare with")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from tests.helpers_cache import store_files

    root = Path(tempfile.mkdtemp(prefix="revq-scale-"))
    try:
        n = args.samples
        staged = root / "staged.zarr"
        stage_s = stage(staged, n)
        print(f"{n:,} latents {SHAPE} float16 staged in {stage_s:.1f} s "
              f"({os.cpu_count()} cores; phase one, not timed below)")
        results = {}
        for ranks in (1, 2):
            store = root / f"store{ranks}.zarr"
            shutil.copytree(staged, store)
            results[ranks] = {"finalize": run_phase("finalize", store, ranks, args)}
            for phase in ("load", "stream"):
                results[ranks][phase] = run_phase(phase, store, ranks, args)
        same = store_files(root / "store1.zarr") == store_files(root / "store2.zarr")
        print(f"the 1-rank and the 2-rank stores are the same bytes: {same}")
        per = 100_000 / n
        print(f"\n{'phase':<10}{'1 rank':>11}{'2 ranks':>11}{'each rank (2)':>18}"
              f"{'1.28 M, 1 / 2 ranks':>24}{'10 M, 1 / 2 ranks':>22}   (s per 100,000 latents; extrapolated s)")
        for phase in ("finalize", "load", "stream"):
            one, two = results[1][phase]["phase"] * per, results[2][phase]["phase"] * per
            each = " / ".join(f"{s * per:.1f}" for s in results[2][phase]["ranks"])
            print(f"{phase:<10}{one:>11.2f}{two:>11.2f}{each:>18}{one * 12.81:>12.0f} / {two * 12.81:<9.0f}"
                  f"{one * 100:>12.0f} / {two * 100:<9.0f}")
        longest = max(results[r][p]["phase"] * per * 100 for r in (1, 2) for p in ("finalize", "load", "stream"))
        print(f"dist.timeout_minutes={args.timeout_minutes:g} = {args.timeout_minutes * 60:,.0f} s; the longest "
              f"phase extrapolated to 10 M latents here: {longest:,.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
