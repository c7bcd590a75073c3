"""`revq-pipe prior sample`: class-conditional samples of a trained prior, as ids and as decoded images.

The ids are decoded through the tokenizer the training tokens came from (recorded in the token store,
refused if it has changed since) and its VAE. Outputs, in RUN/samples/, named after the settings so
that samples of different settings never overwrite each other (the same settings again replace them):

    <name>.npz   ids (N, T) in the store's dtype, class_ids (N,)
    <name>.json  the settings, the prior run and the tokenizer that decodes the ids
    <name>.png   the decoded images, one labelled row per class
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from revq_pipe.cache.token_store import TokenStore, ids_dtype
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.files import atomic_path, atomic_write_text
from revq_pipe.pipeline.images import to_uint8
from revq_pipe.pipeline.prior import TokenPrior
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.grid import write_grid
from revq_pipe.stages.prior import load_prior, store_tokenizer
from revq_pipe.stages.run_dir import tokenizer_vae

SAMPLES_DIR = "samples"
GRID_COLUMNS = 8


def run_prior_sample(cfg: RevqConfig, *, run: str, num: int, class_id: int | None, seed: int) -> Path:
    """Sample `num` images (of class `class_id`, or spread over all classes) from the prior in `run`."""
    pc = cfg.prior
    if num < 1:
        raise ValueError(f"--num {num} must be at least 1")
    device = resolve_device(pc.device)
    prior, provenance = load_prior(run, device)
    classes = sample_classes(prior, num, class_id)
    store = TokenStore.open(provenance["train_tokens"], cfg.storage_options())
    tokenizer = decoding_tokenizer(cfg, store, device)

    start = time.perf_counter()
    ids = generate_ids(prior, classes, cfg_scale=pc.cfg_scale, temperature=pc.temperature, top_k=pc.top_k,
                       seed=seed, batch_size=pc.batch_size)
    sampling_s = time.perf_counter() - start
    images = decode_ids(tokenizer, ids, pc.batch_size)
    log(f"sampled {num} x {prior.spec.num_tokens} ids in {sampling_s:.1f} s "
        f"({num * prior.spec.num_tokens / sampling_s:,.0f} tokens/s, KV cache, cfg {pc.cfg_scale:g})")

    scope = "all" if class_id is None else f"class{class_id}"
    name = f"samples_{scope}_n{num}_cfg{pc.cfg_scale:g}_t{pc.temperature:g}_k{pc.top_k}_seed{seed}"
    stem = Path(run) / SAMPLES_DIR / name
    replaced = stem.with_suffix(".npz").is_file()
    with atomic_path(stem.with_suffix(".npz")) as tmp:
        np.savez(tmp, ids=ids.numpy().astype(ids_dtype(prior.spec.codebook_size)), class_ids=classes.numpy())
    atomic_write_text(stem.with_suffix(".json"), json.dumps({
        "num": num, "class_id": class_id, "cfg_scale": pc.cfg_scale, "temperature": pc.temperature,
        "top_k": pc.top_k, "seed": seed, "prior_run": str(Path(run).resolve()), "train_tokens": str(store.path),
        "tokenizer": store.attrs["tokenizer"], "sampling_s": sampling_s,
        "ids": "ids (N, T): per-position ids, id k at position t is codebook[t, k] of the tokenizer"}, indent=2) + "\n")
    rows, labels = class_rows(images, classes, class_names(store))
    write_grid(stem.with_suffix(".png"), rows, labels)
    log(f"{'replaced' if replaced else 'wrote'} {stem}.npz (ids), .json (settings) and .png (decoded grid)")
    return stem.with_suffix(".npz")


def sample_classes(prior: TokenPrior, num: int, class_id: int | None) -> torch.Tensor:
    """(num,) class ids: all `class_id`, or 0, 1, ..., C-1, 0, 1, ... (the null class when the prior has none)."""
    spec = prior.spec
    if class_id is not None and not 0 <= class_id < spec.num_classes:
        raise ValueError(f"--class {class_id} is not a class of this prior (0..{spec.num_classes - 1})")
    if class_id is not None:
        return torch.full((num,), class_id, dtype=torch.long)
    if spec.num_classes == 0:
        return torch.full((num,), spec.null_class, dtype=torch.long)
    return torch.arange(num, dtype=torch.long) % spec.num_classes


@torch.no_grad()
def generate_ids(prior: TokenPrior, classes: torch.Tensor, *, cfg_scale: float, temperature: float, top_k: int,
                 seed: int, batch_size: int) -> torch.Tensor:
    """Ids (N, T) on the CPU for the given classes, in batches, from one seeded stream (the same ids every run)."""
    device = prior.codebooks.device
    generator = torch.Generator(device).manual_seed(seed)
    parts = [prior.generate(chunk.to(device), cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                            generator=generator).cpu() for chunk in classes.split(batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def decode_ids(tokenizer: RevqTokenizer, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Ids (N, T) -> decoded images (N, 3, R, R) uint8 on the CPU."""
    return torch.cat([to_uint8(tokenizer.decode(chunk)).cpu() for chunk in ids.split(batch_size)])


def decoding_tokenizer(cfg: RevqConfig, store: TokenStore, device: torch.device) -> RevqTokenizer:
    """The tokenizer of a token store's ids with its VAE attached (the one it records, unless --vae names one)."""
    tokenizer = store_tokenizer(store, device)
    tokenizer_vae(cfg, tokenizer, device)
    return tokenizer


def class_names(store: TokenStore) -> list[str] | None:
    """The class folder names of the store's images, when its source had them (an ImageFolder tree)."""
    return store.attrs["source"].get("classes")


def class_label(class_id: int, names: list[str] | None) -> str:
    return f"class {class_id}" + (f" {names[class_id]}" if names and class_id < len(names) else "")


def class_rows(images: torch.Tensor, classes: torch.Tensor, names: list[str] | None,
               columns: int = GRID_COLUMNS) -> tuple[list[torch.Tensor], list[str]]:
    """Grid rows of one class each, all of the same length (at most `columns`, at most the rarest class's
    count), with their labels; images past the last full row of a class are left out."""
    present = torch.unique(classes).tolist()
    width = min(columns, *(int((classes == c).sum()) for c in present))
    rows, labels = [], []
    for c in present:
        mine = images[classes == c]
        for start in range(0, len(mine) - width + 1, width):
            rows.append(mine[start:start + width])
            labels.append(class_label(c, names))
    return rows, labels
