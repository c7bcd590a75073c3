"""Adapt a trained (or imported) tokenizer to a new domain: `revq-pipe train --init-from` with a recipe.

The tokenizer's geometry (T, K, the rectifier) is taken from it, so only the new domain's caches and a run
directory need naming; what adapts is a choice (`adapt.train`: codebooks, rectifier, statistics), and the
default schedule is `adapt.steps` optimizer steps, however many epochs that is on the new data. Every
epoch's record carries the starting tokenizer's validation scores on the new domain (`init_val_*`) beside
the adapted one's, and the gate (pipeline/rectifier.py) keeps the rectifier from making the new domain's
held-out latents worse than its codes. The recipe's measurement is in docs/adapt.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.choices import ADAPTABLE
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log


def run_adapt(cfg: RevqConfig, *, source: str) -> Path:
    """Fine-tune the tokenizer folder `source` on cfg.data.train_cache into cfg.train.run; returns the run."""
    from revq_pipe.stages.train import holdout_count, run_train

    adapted = adapted_config(cfg, source)
    cache = LatentCache.open(adapted.data.train_cache, options=adapted.storage_options())
    if not cfg.adapt.epochs:
        trained = cache.num_samples - holdout_count(adapted, cache.num_samples)
        per_epoch = max(1, math.ceil(trained / adapted.train.batch_size))
        adapted.train.epochs = max(cfg.adapt.min_epochs, math.ceil(cfg.adapt.steps / per_epoch))
    kept = [part for part in ADAPTABLE if part not in cfg.adapt.train]
    log(f"adapting {source} to {cache.path} ({cache.num_samples} latents): training {', '.join(cfg.adapt.train)}"
        f"{'; keeping ' + ', '.join(kept) if kept else ''}; {adapted.train.epochs} epochs at batch "
        f"{adapted.train.batch_size}, codebook lr {adapted.train.codebook_lr:g}, rectifier lr "
        f"{adapted.train.rectifier_lr:g}")
    return run_train(adapted)


def adapted_config(cfg: RevqConfig, source: str) -> RevqConfig:
    """cfg with the train settings of the recipe: the tokenizer's geometry, what adapts, the learning rates."""
    settings = _tokenizer_settings(source)
    adapted = dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer, num_tokens=settings["num_tokens"],
                                                                     codebook_size=settings["codebook_size"]),
                                  rectifier=dataclasses.replace(cfg.rectifier, **settings["rectifier"]))
    adapted.train = dataclasses.replace(
        cfg.train, init_from=source, trainable=[part for part in cfg.adapt.train if part != "statistics"],
        init_statistics="statistics" not in cfg.adapt.train, codebook_lr=cfg.adapt.codebook_lr,
        rectifier_lr=cfg.adapt.rectifier_lr, epochs=cfg.adapt.epochs or cfg.train.epochs)
    return adapted


def _tokenizer_settings(source: str) -> dict:
    """T, K and the rectifier spec a tokenizer folder records (config.json), without loading its weights."""
    path = Path(source) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {source} (config.json is missing); pass --from with the tokenizer/ "
                                "folder of a finished `revq-pipe train` run or of `revq-pipe import-reference`")
    data = json.loads(path.read_text())
    rectifier = {k: v for k, v in data.get("rectifier", {}).items() if k != "forward"}  # forward: this machine's
    return {"num_tokens": data["num_tokens"], "codebook_size": data["codebook_size"], "rectifier": rectifier}
