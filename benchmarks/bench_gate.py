"""The rectifier's gate: validation MSE, quantized vs rectified, every epoch, with the gate and without it.

    .venv/bin/python benchmarks/bench_gate.py [--seeds 0] [--epochs 3]

Builds 32x8x8 latents of four structures (low rank 8 with noise 0.3, low rank 4 with noise 0.1, per-element
offsets and scales around a 6-dimensional subspace, spatially smooth fields with noise), 2,048 or 1,024
training and 256 validation latents, and trains T=512 tokens of d=4 with the paper's learning rates at
batch sizes giving 8, 4, 2 and 1 steps per epoch (the same number with or without the held-out latents): once with the default gate (train.gate=true: training
latents held out, the gate fitted on them after every epoch) and once without (train.gate=false). Prints,
per run, each epoch's validation MSE quantized -> rectified, and flags an epoch where the rectifier made
the validation latents worse than the codes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from revq_pipe.cache.importer import import_tensor  # noqa: E402
from revq_pipe.stages.config import load_config  # noqa: E402
from revq_pipe.stages.train import holdout_count, run_train  # noqa: E402

SHAPE, SIZE = (32, 8, 8), 2048


def low_rank(n: int, seed: int, rank: int, noise: float) -> np.ndarray:
    basis = np.random.default_rng(123 + rank).normal(size=(rank, SIZE))
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, rank)) @ basis / np.sqrt(rank) + noise * rng.normal(size=(n, SIZE))


def offsets(n: int, seed: int) -> np.ndarray:
    fixed = np.random.default_rng(99)
    basis, offset, scale = fixed.normal(size=(6, SIZE)), fixed.normal(0, 2, SIZE), fixed.uniform(0.5, 2, SIZE)
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6)) @ basis + 0.3 * rng.normal(size=(n, SIZE))) * scale + offset


def smooth(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, *SHAPE))
    for _ in range(2):  # neighbouring latent positions correlate
        x = (x + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / np.sqrt(3)
    return x.reshape(n, SIZE) + 0.5 * np.random.default_rng(seed + 1).normal(size=(n, SIZE))


DATA = {"low rank 8, noise 0.3": lambda n, s: low_rank(n, s, 8, 0.3),
        "low rank 4, noise 0.1": lambda n, s: low_rank(n, s, 4, 0.1),
        "offsets and scales": offsets, "smooth": smooth}
# (training latents, K, rectifier width x depth, steps per epoch): the batch is what gives that many steps
SETTINGS = ((2048, 1024, 128, 2, 8), (1024, 512, 128, 1, 4), (1024, 512, 128, 1, 2), (1024, 512, 128, 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated data and training seeds")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="revq-gate-"))
    worse = {True: 0, False: 0}
    try:
        print(f"{'data':<22}{'latents':>8}{'batch':>7}{'seed':>5}  {'gate':<5} steps  val MSE quantized -> rectified "
              "per epoch (gate value)")
        for (name, make), (n, k, width, depth, steps), seed in itertools.product(
                DATA.items(), SETTINGS, [int(s) for s in args.seeds.split(",")]):
            folder = root / f"{len(list(root.iterdir()))}"
            folder.mkdir()
            caches = []
            for split, count, data_seed in (("train", n, seed), ("val", 256, seed + 100)):
                np.save(folder / f"{split}.npy", make(count, data_seed).reshape(count, *SHAPE).astype(np.float32))
                import_tensor(folder / f"{split}.npy", folder / f"{split}.zarr", split=split, chunk_size=256)
                caches.append(folder / f"{split}.zarr")
            for gate in (True, False):
                trained = n - (holdout_count(load_config(None, [], {}), n) if gate else 0)
                batch = -(-trained // steps)
                overrides = ["quantizer.num_tokens=512", f"quantizer.codebook_size={k}", f"rectifier.width={width}",
                             f"rectifier.depth={depth}", f"train.batch_size={batch}", f"train.epochs={args.epochs}",
                             "train.device=cpu", f"train.seed={seed}", f"train.gate={str(gate).lower()}",
                             "train.allow_small_cache=true", "train.log_every=100000",
                             f"data.train_cache={caches[0]}", f"data.val_cache={caches[1]}",
                             f"train.run={folder / f'run-{gate}'}"]
                with contextlib.redirect_stderr(io.StringIO()):
                    run = run_train(load_config(None, overrides, {}))
                metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                epochs = [f"{m['val_quant_mse']:.6f} -> {m['val_rect_mse']:.6f}"
                          + (f" ({m['gate']:.2f})" if gate else "")
                          + (" WORSE" if m["val_rect_mse"] > m["val_quant_mse"] else "") for m in metrics]
                worse[gate] += sum(m["val_rect_mse"] > m["val_quant_mse"] for m in metrics)
                print(f"{name:<22}{n:>8}{batch:>7}{seed:>5}  {'on' if gate else 'off':<5}{metrics[0]['step']:>5}  "
                      + " | ".join(epochs), flush=True)
        print(f"epochs where the rectifier made the validation latents worse: with the gate {worse[True]}, "
              f"without {worse[False]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
