"""The training run directory: config check on resume, metrics.jsonl, atomic checkpoints.

A run directory holds config.yaml (resolved), metrics.jsonl (one line per finished epoch) and
checkpoint.pt (the state after the last finished epoch). Starting a run whose directory holds a
checkpoint of the same config resumes from it; a different config is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from revq_pipe.stages.config import RevqConfig, config_to_dict, save_config
from revq_pipe.stages.distributed import DistContext

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "revq-train-checkpoint"
CHECKPOINT_VERSION = 1


def prepare_run_dir(cfg: RevqConfig, ctx: DistContext) -> dict[str, Any] | None:
    """Validate the run directory, write config.yaml, and return the checkpoint to resume (or None).

    Every rank reads the directory before rank 0 writes anything, so all ranks decide alike.
    """
    run = Path(cfg.train.run)
    checkpoint_path = run / CHECKPOINT_NAME
    resume = checkpoint_path.is_file()
    if resume:
        _refuse_different_config(cfg, run)
    ctx.barrier()
    checkpoint = load_checkpoint(checkpoint_path) if resume else None
    ctx.barrier()  # nobody rewrites the directory while another rank still reads it
    if ctx.is_main:
        save_config(cfg, run / CONFIG_NAME)
        if checkpoint is None:
            (run / METRICS_NAME).unlink(missing_ok=True)
        else:
            truncate_metrics(run / METRICS_NAME, checkpoint["epoch"])
    ctx.barrier()
    return checkpoint


def _refuse_different_config(cfg: RevqConfig, run: Path) -> None:
    saved_path = run / CONFIG_NAME
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
    if saved == current:
        return
    if saved is None:
        detail = f"{saved_path} is missing"
    else:
        changed = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
                   for section, values in current.items() for key, value in values.items()
                   if saved.get(section, {}).get(key) != value]
        detail = "changed settings: " + "; ".join(changed[:8])
    raise ValueError(f"run directory {run} holds a checkpoint of a different training config ({detail}); "
                     "use a new --run directory, or remove that one to start over")


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only the lines of epochs <= last_epoch (a killed run may have logged a later one)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    _atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any], ctx: DistContext) -> None:
    """Rank 0 writes `state` to a temporary file and renames it, so a crash never tears it."""
    if ctx.is_main:
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    ctx.barrier()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (tensors and plain containers only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a revq-pipe training checkpoint of version {CHECKPOINT_VERSION}; "
                         "remove the run directory (or use a new --run) to start over")
    return state


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and every CUDA device) as tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
