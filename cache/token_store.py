"""A Zarr store of token ids for a whole split: what generative models train on.

    ids     (N, T)  uint16 when K <= 65536, else int32   one codebook index per token position
    labels  (N,)    int32                                class id, -1 when unknown
    keys    (N,)    string                               source sample key

Group attributes: format "revq-token-store", the token layout (T, d, K, latent shape and which
latent channel/rows/columns each position covers), the tokenizer identity (its directory and a
hash of model.safetensors), the VAE identity, where the ids came from, skipped inputs, and
`complete`, set last.

Writing is two-phase and resumable like the latent cache (cache/staging.py): units of
`chunk_size` consecutive inputs are staged atomically (one object each, also on an object store) as
STORE/_staging/unit_*.npz by whichever
rank owns them (u % world_size == rank), then rank 0 assembles the arrays in unit order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from revq_pipe.cache.schema import CacheError, small_compressors
from revq_pipe.pipeline.version import package_version
from revq_pipe.cache import storage
from revq_pipe.cache.staging import StagedWriter, as_location, read_store_attrs

TOKEN_FORMAT = "revq-token-store"
TOKEN_FORMAT_VERSION = 1


def ids_dtype(codebook_size: int) -> str:
    """The smallest stored dtype that holds every id of a K-entry codebook."""
    return "uint16" if codebook_size <= 2**16 else "int32"


class TokenWriter(StagedWriter):
    """Writes one split's token store; create it with `TokenWriter.open`."""

    FORMAT = TOKEN_FORMAT
    NOUN = "token store"
    CONTENTS = "tokens"
    OUT_HINT = "--out"
    SPEC_FIELDS = ("split", "num_inputs", "chunk_size", "num_tokens", "codebook_size", "ids_dtype",
                   "layout", "tokenizer", "vae", "source")

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any],
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(path, attrs["num_inputs"], attrs["chunk_size"], options)
        self.attrs = attrs

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        num_inputs: int,
        split: str,
        num_tokens: int,
        codebook_size: int,
        layout: dict[str, Any],
        tokenizer: dict[str, Any],
        vae: dict[str, Any],
        source: dict[str, Any],
        chunk_size: int = 1024,
        overwrite: bool = False,
        create: bool = True,
        options: dict[str, Any] | None = None,
    ) -> "TokenWriter":
        """Create a new store, or resume an unfinished one started with the identical spec.

        Args:
            path: the Zarr store: a local directory or a URL (any fsspec scheme).
            num_inputs: inputs to tokenize (samples plus those that will be skipped).
            split: split name recorded in the store.
            num_tokens, codebook_size: T and K of the tokenizer.
            layout: RevqTokenizer.token_layout() (JSON values only).
            tokenizer: {"dir", "model_sha256"} of the tokenizer.
            vae: {"source", "class", "weights_sha256"} of the VAE the ids belong to.
            source: where the ids come from, e.g. {"kind": "images", "path": ..., "image": recipe}.
            chunk_size: inputs per work unit and rows per Zarr chunk.
            overwrite: replace a complete store, or an unfinished one with another spec.
            create: True on rank 0 only; other ranks pass False after a barrier and attach.
            options: fsspec storage options for a URL; None = the standard places.
        """
        path = as_location(path)
        spec = cls._spec(num_inputs=num_inputs, split=split, num_tokens=num_tokens, codebook_size=codebook_size,
                         layout=layout, tokenizer=tokenizer, vae=vae, source=source, chunk_size=chunk_size)
        cls._open_store(path, spec, overwrite=overwrite, create=create, options=options)
        return cls(path, spec, options)

    @classmethod
    def completed(cls, path: str | os.PathLike, options: dict[str, Any] | None = None,
                  **spec: Any) -> dict[str, Any] | None:
        """The attributes of a complete store at `path` made with exactly this spec (open's arguments), else None."""
        return cls._completed_attrs(path, cls._spec(**spec), options)

    @staticmethod
    def _spec(*, num_inputs: int, split: str, num_tokens: int, codebook_size: int, layout: dict[str, Any],
              tokenizer: dict[str, Any], vae: dict[str, Any], source: dict[str, Any], chunk_size: int = 1024
              ) -> dict[str, Any]:
        """The store's attributes before it is finished (JSON values only)."""
        if num_inputs < 1 or chunk_size < 1:
            raise ValueError(f"num_inputs={num_inputs}, chunk_size={chunk_size}: need at least one input "
                             "and a positive chunk size; check the image source")
        spec = {"format": TOKEN_FORMAT, "format_version": TOKEN_FORMAT_VERSION, "complete": False,
                "split": split, "num_inputs": int(num_inputs), "chunk_size": int(chunk_size),
                "num_tokens": int(num_tokens), "codebook_size": int(codebook_size),
                "ids_dtype": ids_dtype(codebook_size), "layout": layout, "tokenizer": tokenizer, "vae": vae,
                "source": source, "num_samples": 0, "package_version": package_version()}
        return json.loads(json.dumps(spec))  # tuples -> lists, so a stored spec compares equal

    @classmethod
    def _describe_complete(cls, stored: dict[str, Any]) -> str:
        return f"a complete token store of {stored.get('num_samples')} images"

    def write_unit(self, u: int, ids: np.ndarray, labels: np.ndarray, keys: Sequence[str],
                   skipped: Sequence[tuple[str, str]] = ()) -> None:
        """Stage unit u atomically: ids (n, T) of its readable inputs in input order, labels (n,), keys, skipped."""
        start, stop = self.unit_range(u)
        ids, labels = np.asarray(ids), np.asarray(labels)
        n, T, K = len(keys), self.attrs["num_tokens"], self.attrs["codebook_size"]
        if ids.shape != (n, T) or labels.shape != (n,) or n + len(skipped) != stop - start:
            raise ValueError(f"unit {u}: ids {ids.shape}, labels {labels.shape}, {n} keys and {len(skipped)} "
                             f"skipped do not describe the unit's {stop - start} inputs with {T} tokens each")
        if n and (ids.min() < 0 or ids.max() >= K):
            raise ValueError(f"unit {u}: ids range over [{ids.min()}, {ids.max()}], outside the codebook [0, {K})")
        arrays = {"ids": ids.astype(self.attrs["ids_dtype"]), "labels": labels.astype(np.int32),
                  "keys": np.array(list(keys), dtype=str),
                  "skipped_keys": np.array([k for k, _ in skipped], dtype=str),
                  "skipped_reasons": np.array([r for _, r in skipped], dtype=str)}
        self._stage(u, arrays)

    def finalize(self) -> dict[str, Any]:
        """Assemble ids, labels and keys in unit order (rank 0, once every unit is staged); returns the attrs."""
        self._require_all_staged("rerun with the same arguments to finish them")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "labels", "keys", "skipped_keys",
                                                               "skipped_reasons")}
        for u in range(self.num_units):  # token ids are small: T * 2 bytes per image
            with self._load_unit(u) as part:
                for name in parts:
                    parts[name].append(part[name])
        data = {name: np.concatenate(arrays) for name, arrays in parts.items()}
        if len(data["keys"]) == 0:
            raise CacheError(f"all {self.num_inputs} inputs for {self.path} were skipped; nothing to store. "
                             "Check the image source.")
        group = self._open_group("r+")
        cs = self.chunk_size
        for name in ("ids", "labels", "keys"):
            array = group.create_array(name, shape=data[name].shape, chunks=(cs, *data[name].shape[1:]),
                                       dtype=str if name == "keys" else data[name].dtype,
                                       compressors=small_compressors(), overwrite=True)
            array[...] = data[name]
        attrs = {**self.attrs, "num_samples": int(len(data["keys"])),
                 "skipped": {"count": int(len(data["skipped_keys"])), "keys": data["skipped_keys"].tolist(),
                             "reasons": data["skipped_reasons"].tolist()}}
        self._mark_complete(group, attrs)
        return {**attrs, "complete": True}


class TokenStore:
    """A complete token store opened for reading; create it with `TokenStore.open`."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = path
        self.attrs = dict(group.attrs)
        self._group = group

    @classmethod
    def open(cls, path: str | os.PathLike, options: dict[str, Any] | None = None) -> "TokenStore":
        path = as_location(path)
        attrs = read_store_attrs(path, options)
        if attrs is None or attrs.get("format") != TOKEN_FORMAT:
            raise CacheError(f"no token store at {path}; write one with `revq-pipe tokenize --out {path}`")
        if attrs.get("format_version") != TOKEN_FORMAT_VERSION:
            raise CacheError(f"{path} has token store version {attrs.get('format_version')!r}, this revq-pipe "
                             f"reads {TOKEN_FORMAT_VERSION}; re-export it with `revq-pipe tokenize --overwrite`")
        if not attrs.get("complete", False):
            raise CacheError(f"the token store at {path} is incomplete (the export was interrupted); rerun "
                             "`revq-pipe tokenize` with the same arguments to resume it")
        store = path if isinstance(path, Path) else storage.zarr_store(path, "r", options)
        return cls(path, zarr.open_group(store, mode="r"))

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    def ids(self) -> np.ndarray:
        """Token ids (N, T) in the stored dtype."""
        return np.asarray(self._group["ids"][...])

    def labels(self) -> np.ndarray:
        return np.asarray(self._group["labels"][...], dtype=np.int32)

    def keys(self) -> list[str]:
        return [str(k) for k in self._group["keys"][...].tolist()]
