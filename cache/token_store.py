"""A Zarr store of token ids for a whole split: what generative models train on.

    ids     (N, T)  uint16 when K <= 65536, else int32   one codebook index per token position
    labels  (N,)    int32                                class id, -1 when unknown
    keys    (N,)    string                               source sample key

Group attributes: format "revq-token-store", the token layout (T, d, K, latent shape and which
latent channel/rows/columns each position covers), the tokenizer identity (its directory and a
hash of model.safetensors), the VAE identity, where the ids came from, skipped inputs, and
`complete`, set last.

Writing is two-phase and resumable like the latent cache (cache/writer.py): units of
`chunk_size` consecutive inputs are staged atomically as STORE/_staging/unit_*.npz by whichever
rank owns them (u % world_size == rank), then rank 0 assembles the arrays in unit order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from cache.schema import STAGING_DIR, CacheError, package_version, small_compressors
from cache.writer import read_store_attrs

TOKEN_FORMAT = "revq-token-store"
TOKEN_FORMAT_VERSION = 1
_SPEC_FIELDS = ("split", "num_inputs", "chunk_size", "num_tokens", "codebook_size", "ids_dtype",
                "layout", "tokenizer", "vae", "source")


def ids_dtype(codebook_size: int) -> str:
    """The smallest stored dtype that holds every id of a K-entry codebook."""
    return "uint16" if codebook_size <= 2**16 else "int32"


class TokenWriter:
    """Writes one split's token store; create it with `TokenWriter.open`."""

    def __init__(self, path: Path, attrs: dict[str, Any]) -> None:
        self.path = path
        self.attrs = attrs
        self.num_inputs = attrs["num_inputs"]
        self.chunk_size = attrs["chunk_size"]
        self.num_units = math.ceil(self.num_inputs / self.chunk_size)
        self._staging = path / STAGING_DIR

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
    ) -> "TokenWriter":
        """Create a new store, or resume an unfinished one started with the identical spec.

        Args:
            path: local directory of the Zarr store.
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
        """
        path = Path(path)
        if num_inputs < 1 or chunk_size < 1:
            raise ValueError(f"num_inputs={num_inputs}, chunk_size={chunk_size}: need at least one input "
                             "and a positive chunk size; check the image source")
        spec = {"format": TOKEN_FORMAT, "format_version": TOKEN_FORMAT_VERSION, "complete": False,
                "split": split, "num_inputs": int(num_inputs), "chunk_size": int(chunk_size),
                "num_tokens": int(num_tokens), "codebook_size": int(codebook_size),
                "ids_dtype": ids_dtype(codebook_size), "layout": layout, "tokenizer": tokenizer, "vae": vae,
                "source": source, "num_samples": 0, "package_version": package_version()}
        spec = json.loads(json.dumps(spec))  # tuples -> lists, so a stored spec compares equal
        stored = read_store_attrs(path)
        if not create:
            if stored is None or stored.get("format") != TOKEN_FORMAT or stored.get("complete", True):
                raise CacheError(f"no unfinished token store at {path} to attach to; rank 0 must call "
                                 "TokenWriter.open(..., create=True) first")
            if _spec_differences(stored, spec):
                raise CacheError(f"the unfinished token store at {path} was started with other settings "
                                 f"({'; '.join(_spec_differences(stored, spec))}); every rank must pass the same")
            return cls(path, spec)
        if path.exists() and not path.is_dir():
            raise CacheError(f"{path} is a file, not a directory; choose another --out")
        if path.is_dir() and any(path.iterdir()):
            if stored is None:
                raise CacheError(f"{path} is not empty and is not a Zarr store; refusing to write tokens into it "
                                 "even with --overwrite. Choose a new or empty --out.")
            resumable = stored.get("format") == TOKEN_FORMAT and not stored.get("complete", False)
            if resumable and not _spec_differences(stored, spec):
                return cls(path, spec)
            if not overwrite:
                what = ("an unfinished token store started with other settings "
                        f"({'; '.join(_spec_differences(stored, spec))})" if resumable else
                        f"a complete token store of {stored.get('num_samples')} images"
                        if stored.get("format") == TOKEN_FORMAT else "a Zarr store that is not a token store")
                raise CacheError(f"{path} holds {what}; pass --overwrite to replace it, or choose another --out")
            shutil.rmtree(path)
        group = zarr.open_group(path, mode="w")
        group.attrs.update(spec)
        (path / STAGING_DIR).mkdir()
        return cls(path, spec)

    def unit_range(self, u: int) -> tuple[int, int]:
        """Input indices [start, stop) of work unit u."""
        if not 0 <= u < self.num_units:
            raise ValueError(f"unit {u} is out of range; this store has units 0..{self.num_units - 1}")
        start = u * self.chunk_size
        return start, min(start + self.chunk_size, self.num_inputs)

    def pending_units(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Units this rank owns (u % world_size == rank) that are not staged yet."""
        return [u for u in range(rank, self.num_units, world_size) if not self._unit_file(u).is_file()]

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
        self._staging.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._staging, prefix=f".unit_{u:06d}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self._unit_file(u))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def finalize(self) -> dict[str, Any]:
        """Assemble ids, labels and keys in unit order (rank 0, once every unit is staged); returns the attrs."""
        missing = [u for u in range(self.num_units) if not self._unit_file(u).is_file()]
        if missing:
            raise CacheError(f"{len(missing)} of {self.num_units} units of {self.path} are not written yet "
                             f"(first missing: {missing[:5]}); rerun with the same arguments to finish them")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "labels", "keys", "skipped_keys",
                                                               "skipped_reasons")}
        for u in range(self.num_units):  # token ids are small: T * 2 bytes per image
            with np.load(self._unit_file(u), allow_pickle=False) as part:
                for name in parts:
                    parts[name].append(part[name])
        data = {name: np.concatenate(arrays) for name, arrays in parts.items()}
        if len(data["keys"]) == 0:
            raise CacheError(f"all {self.num_inputs} inputs for {self.path} were skipped; nothing to store. "
                             "Check the image source.")
        group = zarr.open_group(self.path, mode="r+")
        cs = self.chunk_size
        for name in ("ids", "labels", "keys"):
            array = group.create_array(name, shape=data[name].shape, chunks=(cs, *data[name].shape[1:]),
                                       dtype=str if name == "keys" else data[name].dtype,
                                       compressors=small_compressors(), overwrite=True)
            array[...] = data[name]
        attrs = {**self.attrs, "num_samples": int(len(data["keys"])),
                 "skipped": {"count": int(len(data["skipped_keys"])), "keys": data["skipped_keys"].tolist(),
                             "reasons": data["skipped_reasons"].tolist()}}
        group.attrs.update(attrs)
        group.attrs["complete"] = True  # last: a reader never sees a half-written store as complete
        shutil.rmtree(self._staging, ignore_errors=True)
        return {**attrs, "complete": True}

    def _unit_file(self, u: int) -> Path:
        return self._staging / f"unit_{u:06d}.npz"


class TokenStore:
    """A complete token store opened for reading; create it with `TokenStore.open`."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.attrs = dict(group.attrs)
        self._group = group

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TokenStore":
        path = Path(path)
        attrs = read_store_attrs(path)
        if attrs is None or attrs.get("format") != TOKEN_FORMAT:
            raise CacheError(f"no token store at {path}; write one with `revq-pipe tokenize --out {path}`")
        if attrs.get("format_version") != TOKEN_FORMAT_VERSION:
            raise CacheError(f"{path} has token store version {attrs.get('format_version')!r}, this revq-pipe "
                             f"reads {TOKEN_FORMAT_VERSION}; re-export it with `revq-pipe tokenize --overwrite`")
        if not attrs.get("complete", False):
            raise CacheError(f"the token store at {path} is incomplete (the export was interrupted); rerun "
                             "`revq-pipe tokenize` with the same arguments to resume it")
        return cls(path, zarr.open_group(path, mode="r"))

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


def _spec_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{name}: {stored.get(name)!r} -> {wanted[name]!r}" for name in _SPEC_FIELDS
            if stored.get(name) != wanted[name]]
