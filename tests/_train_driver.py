"""Runs stage two in its own process for the resume and DDP tests (plain python or torchrun).

    python tests/_train_driver.py [--config PRESET] --set data.train_cache=... --set train.run=... \
        [--kill-at EPOCH:BATCH] [--checksums DIR]

--kill-at SIGKILLs this process after it has taken BATCH batches of (1-based) EPOCH: a crash mid-epoch.
--checksums writes, on every rank, one line per finished epoch with checksums of the weights that
rank is about to checkpoint (DIR/rank<r>.jsonl), to show that replicas never drift.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path


import revq_pipe.stages.train as train  # noqa: E402
from revq_pipe.stages.config import load_config  # noqa: E402
from revq_pipe.cache.loader import LatentSource  # noqa: E402


def kill_mid_epoch(epoch: int, batches: int) -> None:
    original = LatentSource.epoch_batches

    def epoch_batches(self, *args, **kwargs):
        for taken, batch in enumerate(original(self, *args, **kwargs)):
            if kwargs["epoch"] + 1 == epoch and taken == batches:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    LatentSource.epoch_batches = epoch_batches


def record_checksums(folder: Path) -> None:
    original = train.save_checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))

    def save_checkpoint(path, state, ctx):
        line = {"epoch": state["epoch"],
                "codebooks": _digest(state["quantizer"]),
                "rectifier": _digest(state["rectifier"])}
        with open(folder / f"rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
        original(path, state, ctx)

    train.save_checkpoint = save_checkpoint


def _digest(state_dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--checksums", default=None)
    args = parser.parse_args()
    if args.kill_at:
        kill_mid_epoch(*map(int, args.kill_at.split(":")))
    if args.checksums:
        record_checksums(Path(args.checksums))
    train.run_train(load_config(args.config, args.overrides, {}))


if __name__ == "__main__":
    main()
