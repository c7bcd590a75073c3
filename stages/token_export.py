"""`revq-pipe tokens export`: a token store in the files autoregressive trainers read.

    --format jsonl  PATH             one JSON line per view: {"class_id", "tokens", "view", "key"}
    --format npy    PATH             codes (N, V, T): N images, V views each, T ids per view
                    PATH.labels.npy  labels (N,) int64, -1 when unknown (<stem>.labels.npy)
    both            <stem>.meta.json what an id means and how to undo --flat, the views, and the store,
                                     tokenizer and VAE the ids came from (written last)

Ids are per position by default: id k at position t means codebook[t, k], so a trainer needs the
position with the id (T embedding tables, or pipeline/prior.py's reading through the codebook
vectors). `--flat` writes t K + k instead: one shared vocabulary of T K ids for trainers with a
single embedding table (cache.token_store.flat_ids; per_position_ids undoes it).

Every file is written atomically; a finished identical export is a no-op, and a different one over
existing files needs --overwrite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from revq_pipe.cache.token_store import TokenStore, flat_ids, ids_dtype
from revq_pipe.pipeline.files import atomic_path
from revq_pipe.stages.console import log

FORMATS = ("jsonl", "npy")
EXPORT_FORMAT, EXPORT_VERSION = "revq-token-export", 1
BLOCK_IMAGES = 4096  # images read from the store at a time


def export_paths(out: str | Path, fmt: str) -> dict[str, Path]:
    """The files of an export to `out`: the data, the labels (npy only) and the metadata."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if out.suffix != f".{fmt}":
        raise ValueError(f"--out {out} should end in .{fmt} for --format {fmt}")
    stem = out.with_suffix("")
    paths = {"data": out, "meta": stem.with_name(stem.name + ".meta.json")}
    if fmt == "npy":
        paths["labels"] = stem.with_name(stem.name + ".labels.npy")
    return paths


def export_meta(store: TokenStore, fmt: str, flat: bool, paths: dict[str, Path]) -> dict[str, Any]:
    """What <stem>.meta.json records (JSON values only)."""
    T, K = store.num_tokens, store.codebook_size
    vocabulary = T * K if flat else K
    meaning = (f"flat: id = t * {K} + k for code k of position t, one vocabulary of {vocabulary} ids; undo with "
               f"t = id // {K}, k = id % {K}") if flat else \
        f"per-position: id k at position t is code k of position t's own codebook (0 <= k < {K})"
    attrs = store.attrs
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "layout": fmt,
            "ids": "flat" if flat else "per-position", "id_meaning": meaning, "num_tokens": T, "codebook_size": K,
            "vocabulary_size": vocabulary, "dtype": ids_dtype(vocabulary), "num_images": store.num_images,
            "num_views": len(store.view_names), "views": store.view_names, "rows": store.num_samples,
            "shape": ([store.num_images, len(store.view_names), T] if fmt == "npy" else None),
            "labels": "class id, -1 when unknown", "classes": attrs["source"].get("classes"),
            "files": {name: path.name for name, path in paths.items()},
            "store": {"path": str(store.path), "split": attrs["split"], "augment": attrs["augment"],
                      "tokenizer": attrs["tokenizer"], "vae": attrs["vae"], "source": attrs["source"],
                      "layout": {k: v for k, v in attrs["layout"].items() if k != "positions"}}}


def run_token_export(store_path: str, *, fmt: str, out: str, flat: bool, overwrite: bool,
                     options: dict[str, Any] | None = None) -> dict[str, Path]:
    """Export the token store at `store_path` to `out` in `fmt`; returns the written files."""
    store = TokenStore.open(store_path, options)
    paths = export_paths(out, fmt)
    meta = export_meta(store, fmt, flat, paths)
    if paths["meta"].is_file() and json.loads(paths["meta"].read_text()) == meta and all(p.is_file() for p in paths.values()):
        log(f"{paths['data']} already holds this export; nothing to do")
        return paths
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist (another export); pass --overwrite to replace "
                              "them, or choose another --out")
    paths["meta"].unlink(missing_ok=True)  # a reader trusts the data only beside its metadata
    (_write_jsonl if fmt == "jsonl" else _write_npy)(store, paths, flat)
    with atomic_path(paths["meta"]) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"exported {store.num_samples} rows ({store.num_images} images x {len(store.view_names)} views) of "
        f"{store.num_tokens} {meta['ids']} ids to {', '.join(str(p) for p in paths.values())}")
    return paths


def _blocks(store: TokenStore, flat: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(first image, ids (n, V, T)) for consecutive blocks of images, flat or per position."""
    V = len(store.view_names)
    for first in range(0, store.num_images, BLOCK_IMAGES):
        last = min(first + BLOCK_IMAGES, store.num_images)
        ids = store.ids(first * V, last * V).reshape(last - first, V, store.num_tokens)
        yield first, flat_ids(ids, store.codebook_size) if flat else ids


def _write_npy(store: TokenStore, paths: dict[str, Path], flat: bool) -> None:
    V, T = len(store.view_names), store.num_tokens
    dtype = ids_dtype(T * store.codebook_size if flat else store.codebook_size)
    with atomic_path(paths["data"]) as tmp:
        codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(store.num_images, V, T))
        for first, ids in _blocks(store, flat):
            codes[first:first + len(ids)] = ids
        codes.flush()
        del codes
    with atomic_path(paths["labels"]) as tmp:
        np.save(tmp, store.labels()[::V].astype(np.int64))  # one label per image (its views share it)


def _write_jsonl(store: TokenStore, paths: dict[str, Path], flat: bool) -> None:
    V, names = len(store.view_names), store.view_names
    labels, keys = store.labels(), store.keys()
    with atomic_path(paths["data"]) as tmp, open(tmp, "w") as handle:
        for first, ids in _blocks(store, flat):
            for i, views in enumerate(ids, start=first):
                for v, tokens in enumerate(views):
                    row = i * V + v
                    handle.write(json.dumps({"class_id": int(labels[row]), "tokens": tokens.tolist(),
                                             "view": names[v], "key": keys[row]}) + "\n")
