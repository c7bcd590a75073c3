"""The staging mechanism shared by the resumable, multi-rank store writers.

Both the latent cache (cache/writer.py) and the token store (cache/token_store.py) are written in
two phases. Phase one cuts the inputs into work units of `chunk_size` consecutive indices; whoever
owns unit u (u % world_size == rank) stages it as STORE/_staging/unit_000123.npz, serialized in
memory and written by one `storage.write_bytes_atomic` (locally a temporary file renamed into place,
on an object store a single PUT), so a unit is either fully there or absent and a killed run
restarted with the same arguments redoes only what is missing. Which units are staged is found by
listing the staging prefix once. Phase two (rank 0) reads the units in unit order, never rank
order, writes the final arrays through `storage.zarr_store`, sets `complete` last (its own write
of zarr.json) and removes the staging parts (`storage.remove_tree`).

A store's location is a local path or a URL (s3://..., any fsspec scheme); `options` are the
fsspec storage options (`storage.storage_options(cfg.storage.endpoint_url)`; None = the standard
places). A URL is never turned into a Path. See cache/storage.py for the object-store design.

`StagedWriter` holds that mechanism: opening (create, resume an unfinished store with the same
spec, or refuse / overwrite), unit bookkeeping, atomic staging and the finishing steps. Subclasses
say what they store and how to check it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from revq_pipe.cache import storage
from revq_pipe.cache.schema import STAGING_DIR, CacheError

_UNIT_NAME = re.compile(r"^unit_(\d+)\.npz$")

Location = str | Path


def as_location(location: str | os.PathLike) -> Location:
    """A URL stays a string (never a Path: pathlib folds s3://b/k into s3:/b/k); a local path becomes a Path."""
    if storage.is_url(location):
        return str(location)
    storage.local_path(location)  # StorageError for a mangled URL such as "s3:/b/k"
    return Path(location)


def read_store_attrs(path: str | os.PathLike, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The group attributes of a Zarr store at path (local or URL), or None when there is none."""
    location = as_location(path)
    if isinstance(location, Path):
        meta = location / "zarr.json"
        if not meta.is_file():
            return None
        try:
            return dict(json.loads(meta.read_text()).get("attributes", {}))
        except (OSError, ValueError):
            return {}
    try:
        data = storage.read_bytes(storage.join(location, "zarr.json"), options)
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        return dict(json.loads(data).get("attributes", {}))
    except (ValueError, AttributeError):
        return {}


def staged_unit_ids(path: str | os.PathLike, options: dict[str, Any] | None = None) -> set[int]:
    """Indices of the units staged under path/_staging, found by one listing (temporary files ignored)."""
    names = storage.list_prefix(storage.join(as_location(path), STAGING_DIR), options)
    return {int(m.group(1)) for m in map(_UNIT_NAME.match, names) if m}


def spec_differences(stored: dict[str, Any], wanted: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """Spec fields whose stored value differs from the wanted one, as 'name: stored -> wanted'.

    `wanted` is compared as JSON would store it (tuples become lists).
    """
    wanted = json.loads(json.dumps(wanted))
    return [f"{name}: {stored.get(name)!r} -> {wanted[name]!r}" for name in fields
            if stored.get(name) != wanted[name]]


class StagedWriter:
    """Base of a two-phase store writer; subclasses set the class attributes below."""

    FORMAT: str = ""                 # the "format" attribute of the stores this writer makes
    NOUN: str = "store"              # what the store is called in messages, e.g. "latent cache"
    CONTENTS: str = "data"           # what is written into it, e.g. "a cache" or "tokens"
    OUT_HINT: str = "output path"    # how the user names the store's path, e.g. "--out"
    SPEC_FIELDS: tuple[str, ...] = ()  # attributes that must match to resume or attach

    def __init__(self, path: str | os.PathLike, num_inputs: int, chunk_size: int,
                 options: dict[str, Any] | None = None) -> None:
        self.path = as_location(path)  # a Path for a local store, the URL string otherwise
        self.options = options
        self.num_inputs = num_inputs
        self.chunk_size = chunk_size
        self.num_units = math.ceil(num_inputs / chunk_size)
        self._staging = storage.join(self.path, STAGING_DIR)

    # ---- opening --------------------------------------------------------------------------------

    @classmethod
    def _describe_complete(cls, stored: dict[str, Any]) -> str:
        """A phrase for a complete store of this kind, e.g. "a complete token store of 5 images"."""
        return f"a complete {cls.NOUN} of {stored.get('num_samples')} samples"

    @classmethod
    def _completed_attrs(cls, path: str | os.PathLike, attrs: dict[str, Any],
                         options: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The attributes of a complete store of this format at `path` whose spec fields equal `attrs`, else
        None: rerunning finished, identical work is then a no-op rather than an error."""
        stored = read_store_attrs(path, options)
        if not stored or stored.get("format") != cls.FORMAT or not stored.get("complete", False):
            return None
        return None if spec_differences(stored, attrs, cls.SPEC_FIELDS) else stored

    @classmethod
    def _open_store(cls, path: Location, attrs: dict[str, Any], *, overwrite: bool, create: bool,
                    options: dict[str, Any] | None = None) -> None:
        """Make `path` a store to stage into: attach (create=False), resume, or create with `attrs`.

        An unfinished store of this format whose spec fields equal `attrs` is resumed as it is; any
        other non-empty directory (or non-empty prefix of a URL) is refused unless `overwrite`
        (never when it is not a Zarr store).
        """
        stored = read_store_attrs(path, options)
        if not create:
            if stored is None or stored.get("format") != cls.FORMAT or stored.get("complete", True):
                raise CacheError(f"no unfinished {cls.NOUN} at {path} to attach to; rank 0 must call "
                                 f"{cls.__name__}.open(..., create=True) before the other ranks")
            diffs = spec_differences(stored, attrs, cls.SPEC_FIELDS)
            if diffs:
                raise CacheError(f"the unfinished {cls.NOUN} at {path} was started with other settings "
                                 f"({'; '.join(diffs)}); every rank must pass the same arguments")
            return
        if not isinstance(path, Path):
            cls._open_remote_store(path, attrs, stored, overwrite=overwrite, options=options)
            return

        if path.exists() and not path.is_dir():
            raise CacheError(f"{path} is a file, not a directory; choose another {cls.OUT_HINT}")
        if path.is_dir() and any(path.iterdir()):
            if cls._resume_existing(path, stored, attrs, overwrite):
                return
            shutil.rmtree(path)

        group = zarr.open_group(path, mode="w")
        group.attrs.update(attrs)
        (path / STAGING_DIR).mkdir()

    @classmethod
    def _open_remote_store(cls, url: str, attrs: dict[str, Any], stored: dict[str, Any] | None, *,
                           overwrite: bool, options: dict[str, Any] | None) -> None:
        """`_open_store` for a URL: a prefix has no directory; "non-empty" means any object below it."""
        fs, key = storage.filesystem(url, options)
        fs.invalidate_cache(key)
        if fs.isfile(key):
            raise CacheError(f"{url} is an object, not a prefix; choose another {cls.OUT_HINT}")
        if storage.list_prefix(url, options):
            if cls._resume_existing(url, stored, attrs, overwrite):
                return
            # no atomic replace on an object store: first a manifest no reader trusts, then delete
            untrusted = {"zarr_format": 3, "node_type": "group", "attributes": {"complete": False}}
            storage.write_bytes_atomic(storage.join(url, "zarr.json"), json.dumps(untrusted).encode(), options)
            storage.remove_tree(url, options)
        group = zarr.open_group(storage.zarr_store(url, "w", options), mode="w")
        group.attrs.update(attrs)

    @classmethod
    def _resume_existing(cls, location: Location, stored: dict[str, Any] | None, attrs: dict[str, Any],
                         overwrite: bool) -> bool:
        """For a non-empty target: True to resume it as it is (an unfinished store of the same spec), False
        when it may be replaced (`overwrite`); CacheError otherwise (never for something not a Zarr store)."""
        if stored is None:
            raise CacheError(f"{location} is not empty and is not a Zarr store; refusing to write {cls.CONTENTS} "
                             f"into it even with --overwrite. Choose a new or empty {cls.OUT_HINT}.")
        resumable = stored.get("format") == cls.FORMAT and not stored.get("complete", False)
        diffs = spec_differences(stored, attrs, cls.SPEC_FIELDS)
        if resumable and not diffs:
            return True
        if not overwrite:
            raise CacheError(cls._refusal(location, stored, resumable, diffs))
        return False

    @classmethod
    def _refusal(cls, path: Location, stored: dict[str, Any], resumable: bool, diffs: list[str]) -> str:
        """Why an existing store cannot be reused, and what to do."""
        if resumable:
            return (f"{path} holds an unfinished {cls.NOUN} started with other settings ({'; '.join(diffs)}); "
                    "rerun with the original settings to resume it, or pass --overwrite to discard it")
        if stored.get("format") == cls.FORMAT:
            return (f"{path} already holds {cls._describe_complete(stored)}; pass --overwrite to replace it, "
                    f"or choose another {cls.OUT_HINT}")
        return (f"{path} holds a Zarr store that is not a {cls.NOUN}; pass --overwrite to replace it, "
                f"or choose another {cls.OUT_HINT}")

    # ---- phase one: staging ---------------------------------------------------------------------

    @property
    def num_staged(self) -> int:
        """How many units are already staged (for a "resuming" log line)."""
        return len(self._staged_units())

    def unit_range(self, u: int) -> tuple[int, int]:
        """Input indices [start, stop) of work unit u."""
        if not (isinstance(u, (int, np.integer)) and 0 <= u < self.num_units):
            raise ValueError(f"unit {u!r} is out of range; this {self.NOUN} has units 0..{self.num_units - 1}")
        start = u * self.chunk_size
        return start, min(start + self.chunk_size, self.num_inputs)

    def unit_batches(self, units: list[int], batch_size: int) -> list[list[int]]:
        """Input indices of `units` in fixed batches that start at each unit's start and never cross its
        end, so every input lands in the same batch whatever the world size or the interruptions."""
        batches = []
        for u in units:
            start, stop = self.unit_range(u)
            batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
        return batches

    def pending_units(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Units this rank owns (u % world_size == rank) that are not staged yet."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        staged = self._staged_units()
        return [u for u in range(rank, self.num_units, world_size) if u not in staged]

    def _stage(self, u: int, arrays: dict[str, np.ndarray]) -> None:
        """Write unit u's arrays as one staging part, atomically (a renamed temporary file, or one PUT)."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        storage.write_bytes_atomic(self._unit_file(u), buffer.getbuffer(), self.options)

    def _unit_file(self, u: int) -> Location:
        return storage.join(self._staging, f"unit_{u:06d}.npz")

    def _staged_units(self) -> set[int]:
        """The staged units in range, by one listing of the staging prefix."""
        return {u for u in staged_unit_ids(self.path, self.options) if u < self.num_units}

    def _is_staged(self, u: int) -> bool:
        return u in self._staged_units()

    # ---- phase two: assembly --------------------------------------------------------------------

    def _require_all_staged(self, hint: str) -> None:
        """CacheError naming the missing units unless every unit is staged; `hint` says what to do."""
        staged = self._staged_units()
        missing = [u for u in range(self.num_units) if u not in staged]
        if missing:
            raise CacheError(f"{len(missing)} of {self.num_units} units of {self.path} are not written yet "
                             f"(first missing: {missing[:5]}); {hint}")

    def _load_unit(self, u: int):
        """Unit u's staged arrays (an NpzFile; use it as a context manager)."""
        return np.load(io.BytesIO(storage.read_bytes(self._unit_file(u), self.options)), allow_pickle=False)

    def _open_group(self, mode: str = "r+") -> zarr.Group:
        """The store's Zarr group (LocalStore for a path, FsspecStore for a URL)."""
        if isinstance(self.path, Path):
            return zarr.open_group(self.path, mode=mode)
        return zarr.open_group(storage.zarr_store(self.path, mode, self.options), mode=mode)

    def _mark_complete(self, group: zarr.Group, attrs: dict[str, Any]) -> None:
        """Write the final attributes, then `complete` last, then drop the staging parts."""
        group.attrs.update(attrs)
        group.attrs["complete"] = True  # last: a reader never sees a half-written store as complete
        storage.remove_tree(self._staging, self.options)
