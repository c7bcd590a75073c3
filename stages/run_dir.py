"""The training run directory: what a run records, how it resumes, and what later commands read from it.

    RUN/config.yaml        the resolved config of the last training start
    RUN/metrics.jsonl      one JSON line per finished epoch
    RUN/checkpoint.pt      the state after the last finished epoch (atomic)
    RUN/tokenizer/         the finished tokenizer (RevqTokenizer.from_pretrained)

Starting a run whose directory holds a checkpoint resumes it. Settings that change what training
computes must be the same; settings that only change how it is logged or what other commands do
may change, and `train.epochs` may grow to extend the run (see `resume_plan`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import CacheError
from revq_pipe.pipeline.files import atomic_path, atomic_write_text, file_sha256
from revq_pipe.pipeline.tokenizer import WEIGHTS_NAME, RevqTokenizer, TokenizerConfig
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.config import RevqConfig, config_from_dict, config_to_dict, save_config
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_FORMAT = "revq-train-checkpoint"
CHECKPOINT_VERSION = 3  # 3: batch_size is the global batch, the order windowed, the training data recorded

# Settings a resumed run may change: they do not change what training computes. Everything else
# (data, quantizer, rectifier, optimizer, schedule, seed, placement) must match the checkpoint.
RESUME_FREE_SECTIONS = ("paths", "storage", "dist", "vae", "encode", "eval", "tokenize", "tolerance", "prior",
                        "adapt")  # adapt writes what it decides into train.*, which is compared
# where the split is read from and how many ranks share it never change the batches (cache/loader.py)
RESUME_FREE_KEYS = ("data.train_images", "data.val_images", "data.resolution", "train.run", "train.log_every",
                    "train.epochs", "train.device", "train.push_to", "train.data_on_device", "train.deterministic",
                    "quantizer.search_memory_mb")


@dataclass(frozen=True)
class RunKind:
    """What tells apart the run directories of different training commands (`revq-pipe train`, `prior train`).

    Args:
        run_key, epochs_key: the settings naming the run directory and the number of epochs.
        checkpoint_format, checkpoint_version: what its checkpoint.pt records (and must record to resume).
        affects_training: whether a setting ("section.key") changes what training computes; such a
            setting must be the same to resume.
    """

    run_key: str
    epochs_key: str
    checkpoint_format: str
    checkpoint_version: int
    affects_training: Callable[[str], bool]

    def value(self, cfg: RevqConfig, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)


TRAIN_RUN = RunKind("train.run", "train.epochs", CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                    lambda key: key.split(".")[0] not in RESUME_FREE_SECTIONS and key not in RESUME_FREE_KEYS)


# --- resuming -----------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    """What `revq-pipe train` does with a run directory."""

    checkpoint: dict[str, Any] | None  # the state to resume from; None starts fresh
    finished: bool  # the checkpoint already holds cfg.train.epochs epochs: nothing to train


def resume_plan(cfg: RevqConfig, ctx: DistContext, kind: RunKind = TRAIN_RUN) -> ResumePlan:
    """Read the run directory (every rank) and decide: start, resume, extend, or already finished.

    Raises ValueError, before anything is written, when the checkpoint was made with settings that
    change the training computation, or holds more epochs than asked for.
    """
    run = Path(kind.value(cfg, kind.run_key))
    path = run / CHECKPOINT_NAME
    if not path.is_file():
        return ResumePlan(checkpoint=None, finished=False)
    _refuse_changed_training(cfg, run, kind)
    checkpoint = load_checkpoint(path, kind)
    ctx.barrier()  # nobody rewrites the directory while another rank still reads it
    done, wanted = checkpoint["epoch"], kind.value(cfg, kind.epochs_key)
    if wanted < done:
        raise ValueError(f"run directory {run} already holds {done} finished epochs, more than {kind.epochs_key}="
                         f"{wanted}; pass --epochs {done} or more to extend it, or use a new --run")
    return ResumePlan(checkpoint=checkpoint, finished=done == wanted)


def start_run_dir(cfg: RevqConfig, plan: ResumePlan, ctx: DistContext, kind: RunKind = TRAIN_RUN) -> None:
    """Rank 0 writes config.yaml and trims metrics.jsonl to the checkpoint's epochs (all checks passed)."""
    run = Path(kind.value(cfg, kind.run_key))
    if ctx.is_main:
        save_config(cfg, run / CONFIG_NAME)
        if plan.checkpoint is None:
            (run / METRICS_NAME).unlink(missing_ok=True)
        else:
            truncate_metrics(run / METRICS_NAME, plan.checkpoint["epoch"])
    ctx.barrier()


def _refuse_changed_training(cfg: RevqConfig, run: Path, kind: RunKind) -> None:
    saved_path = run / CONFIG_NAME
    if not saved_path.is_file():
        raise ValueError(f"run directory {run} holds a checkpoint but no {CONFIG_NAME}, so it cannot be checked "
                         "against this config; use a new --run directory, or remove that one to start over")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    changed = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
               for section, values in current.items() for key, value in values.items()
               if kind.affects_training(f"{section}.{key}") and saved.get(section, {}).get(key) != value]
    if changed:
        raise ValueError(f"run directory {run} holds a checkpoint trained with other settings (changed: "
                         f"{'; '.join(changed[:8])}); these change what training computes, so the run cannot "
                         "continue with them. Use a new --run directory, or remove that one to start over")


# --- metrics and checkpoints ---------------------------------------------------------------------


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep only the lines of epochs <= last_epoch (a killed run may have logged a later one)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any], ctx: DistContext, kind: RunKind = TRAIN_RUN) -> None:
    """Rank 0 writes `state` atomically (a crash never tears it); every rank waits for it."""
    if ctx.is_main:
        with atomic_path(path) as tmp:
            torch.save({"format": kind.checkpoint_format, "version": kind.checkpoint_version, **state}, tmp)
    ctx.barrier()


def load_checkpoint(path: Path, kind: RunKind = TRAIN_RUN) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (tensors and plain containers only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != kind.checkpoint_format or state.get("version") != kind.checkpoint_version:
        raise ValueError(f"{path} is not a {kind.checkpoint_format} checkpoint of version {kind.checkpoint_version}; "
                         "remove the run directory (or use a new --run) to start over")
    return state


# --- what later commands read from a run ------------------------------------------------------------


def recorded_config(run: str | Path) -> RevqConfig | None:
    """The resolved config the run was trained with (RUN/config.yaml), or None if it records none."""
    path = Path(run) / CONFIG_NAME
    if not path.is_file():
        return None
    return config_from_dict(yaml.safe_load(path.read_text()) or {}, origin=str(path))


# The sections of a run's config.yaml that are the settings of other commands (those that make caches or
# read a run), not of the run: a command given the run takes them from the defaults and from what it is
# passed now, never from the record.
COMMAND_SECTIONS = ("encode", "eval", "tokenize", "tolerance")


def run_base_config(run: str | Path) -> tuple[RevqConfig, RevqConfig | None]:
    """(the config a command given `run` starts from, the run's recorded config or None).

    The start is the built-in defaults, with every section the run recorded that describes it (its data,
    caches, storage, model and training settings; not COMMAND_SECTIONS). What the run's tokenizer decides
    comes from the tokenizer: the image side of its recipe, and its VAE, left unnamed (vae.source "") so
    that `tokenizer_vae` takes the one it records unless the command names another.
    """
    base, recorded = RevqConfig(), recorded_config(run) if run else None
    if recorded is not None:
        for section in dataclasses.fields(base):
            if section.name not in COMMAND_SECTIONS:
                setattr(base, section.name, copy.deepcopy(getattr(recorded, section.name)))
    base.vae.source = ""
    tokenizer = Path(run) / TOKENIZER_DIR if run else None
    if tokenizer is not None and (tokenizer / WEIGHTS_NAME).is_file():
        resolution = TokenizerConfig.read(tokenizer).image.get("resolution")
        if resolution is not None:
            base.data.resolution = int(resolution)
    return base, recorded


def images_of_cache(location: str, options: dict[str, Any] | None = None) -> str | None:
    """The images a complete latent cache was encoded from (its manifest's `source`), or None."""
    try:
        manifest = LatentCache.open(location, options=options).manifest
    except CacheError:  # no cache there (yet), or an unfinished one: nothing to take from it
        return None
    return manifest.source


def load_tokenizer(run: str | Path, device: torch.device, vae: Any = None,
                   search_memory_mb: float = 0) -> RevqTokenizer:
    """RUN/tokenizer with this machine's search budget (quantizer.search_memory_mb; 0 = derived), or an
    error that says how far the run got and how to finish it."""
    run = Path(run)
    directory = run / TOKENIZER_DIR
    if (directory / WEIGHTS_NAME).is_file():
        tokenizer = RevqTokenizer.from_pretrained(directory, device=device, vae=vae)
        tokenizer.quantizer.search_memory_mb = search_memory_mb
        return tokenizer
    checkpoint = run / CHECKPOINT_NAME
    if checkpoint.is_file() or (run / CONFIG_NAME).is_file():  # config.yaml is written before the first epoch
        done = (torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch")
                if checkpoint.is_file() else 0)
        config = recorded_config(run)
        total = config.train.epochs if config is not None else "?"
        raise FileNotFoundError(f"the run {run} is unfinished: {done} of {total} epochs are done"
                                + (" (it stopped during its first epoch)" if done == 0 else "")
                                + f" and it has no {TOKENIZER_DIR}/ yet; rerun the train command to resume it "
                                f"(`revq-pipe train --run {run}` takes the settings the run recorded)")
    raise FileNotFoundError(f"no trained tokenizer in {directory}; pass --run with the directory of a finished "
                            f"`revq-pipe train` run (it holds {TOKENIZER_DIR}/{WEIGHTS_NAME})")


def split_location(cfg: RevqConfig, split: str, kind: str) -> str:
    """cfg.data.<split>_images or <split>_cache (a run's own, when the command was given one)."""
    value = getattr(cfg.data, f"{split}_{kind}", None)
    if not value:
        flag = "--images PATH" if kind == "images" else "--cache STORE"
        raise ValueError(f"split {split!r} has no configured {kind} (only data.train_{kind} and data.val_{kind} "
                         f"exist); pass {flag}")
    return value


def tokenizer_vae(cfg: RevqConfig, tokenizer: RevqTokenizer, device: torch.device) -> FrozenVAE:
    """The VAE for a tokenizer's images, attached to it and recorded in cfg.vae.source: the one cfg names
    (--vae; "" names none), else the one the tokenizer records (RevqTokenizer.vae_source decides). Refused
    when its weights differ from the recorded ones."""
    source = tokenizer.vae_source(cfg.vae.source or None)
    vae = FrozenVAE.load(source, device=device, precision=cfg.vae.precision)
    if tokenizer.vae_identity.get("weights_sha256") is None:
        log(f"warning: the tokenizer records no VAE weights hash (it was trained on imported latents); {source} is "
            "assumed to be the VAE its latents came from")
    tokenizer.attach_vae(vae)
    cfg.vae.source = vae.source  # what the command records is what it used
    return vae


def image_resolution(tokenizer: RevqTokenizer, cfg: RevqConfig) -> int:
    """The image side from the tokenizer's recorded recipe (RevqTokenizer.image_resolution decides); a
    cfg.data.resolution that differs is refused, since the command could not honour it."""
    if tokenizer.image_recipe.get("resolution") is None:
        log(f"warning: the tokenizer records no image recipe (imported latents); using data.resolution="
            f"{cfg.data.resolution}")
    return tokenizer.image_resolution(cfg.data.resolution, what="data.resolution")


def tokenizer_identity(tokenizer_dir: str | Path) -> dict[str, str]:
    """{"dir", "model_sha256"}: which trained tokenizer produced a report or a token store."""
    directory = Path(tokenizer_dir).resolve()
    return {"dir": str(directory), "model_sha256": file_sha256(directory / WEIGHTS_NAME)}
