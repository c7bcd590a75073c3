"""The staging mechanism shared by the resumable, multi-rank store writers.

Both the latent cache (cache/writer.py) and the token store (cache/token_store.py) are written in
two phases. Phase one cuts the inputs into work units of `chunk_size` consecutive indices; whoever
owns unit u (u % world_size == rank) stages it as STORE/_staging/unit_000123.npz, serialized in
memory and written by one `storage.write_bytes_atomic` (locally a temporary file renamed into place,
on an object store a single PUT), so a unit is either fully there or absent and a killed run
restarted with the same arguments redoes only what is missing. Which units are staged is found by
listing the staging prefix once. Phase two runs on every rank at once (`_summarize_blocks`,
`_assemble_rows`): the ranks read the units' small summaries block by block and exchange them, so each
knows where every unit's rows land; then each rank writes a contiguous share of whole chunks of the
final arrays from the units that cover them. Rows are placed by unit order and summaries merged in a
fixed tree (units within blocks of STATS_BLOCK_UNITS, then blocks in order), never by rank, so any
number of ranks writes the same bytes. Rank 0 alone then writes what is small (statistics, the
manifest), sets `complete` last (its own write of zarr.json) and removes the staging parts
(`storage.remove_tree`).

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
from typing import Any, Callable

import numpy as np
import zarr

from revq_pipe.cache import storage
from revq_pipe.cache.collective import Collective, rank_slice, run_everywhere
from revq_pipe.cache.schema import STAGING_DIR, CacheError

_UNIT_NAME = re.compile(r"^unit_(\d+)\.npz$")
RowMaker = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # units' members of some inputs -> their rows
STATS_BLOCK_UNITS = 64  # units per block of the fixed tree that unit summaries are merged in
WRITE_BLOCK_CHUNKS = 8  # chunks handed to Zarr per write call during assembly (Zarr writes them concurrently)


def as_location(location: str | os.PathLike) -> str | Path:
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
    """'field: stored -> wanted' for every spec field whose stored value differs (empty: the same spec).

    `wanted` is compared as JSON would store it (tuples become lists). For a mapping (the VAE identity, the
    image recipe, ...) only its entries that differ are listed, as 'vae.weights_sha256: 3fa2c1d09e8b... -> ...'.
    """
    wanted = json.loads(json.dumps(wanted))
    changes = []
    for name in fields:
        old, new = stored.get(name), wanted.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{name}.{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}"
                        for key in sorted({*old, *new}) if old.get(key) != new.get(key)]
        else:
            changes.append(f"{name}: {_shown(old)} -> {_shown(new)}")
    return changes


def _shown(value: Any) -> str:
    """A value for a message: a hash by its first 12 hex digits, a long list or mapping cut short; a path or URL
    whole (two paths may differ only at their ends)."""
    text = repr(value)
    if isinstance(value, str):
        return text[:13] + "...'" if len(value) > 40 and "/" not in value else text
    return text if len(text) <= 80 else text[:77] + "..."


class StagedWriter:
    """Base of a two-phase store writer; subclasses set the class attributes below."""

    FORMAT: str = ""                 # the "format" attribute of the stores this writer makes
    NOUN: str = "store"              # what the store is called in messages, e.g. "latent cache"
    CONTENTS: str = "data"           # what is written into it, e.g. "a cache" or "tokens"
    OUT_HINT: str = "output path"    # how the user names the store's path, e.g. "--out"
    SPEC_FIELDS: tuple[str, ...] = ()  # attributes that must match to resume or attach
    # spec fields that older versions left unset (None) when they opened a store: an unfinished store without
    # one still resumes, and gets this run's value when it is finalized
    UNSET_BY_OLDER: tuple[str, ...] = ()
    ROW_ARRAYS: tuple[str, ...] = ()  # unit members that become rows of the final arrays, in unit order

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
    def _differences(cls, stored: dict[str, Any], attrs: dict[str, Any]) -> list[str]:
        """spec_differences between a stored store and this run; an unfinished one is compared over the fields it
        recorded (UNSET_BY_OLDER)."""
        unfinished = not stored.get("complete", False)
        fields = tuple(name for name in cls.SPEC_FIELDS
                       if not (unfinished and name in cls.UNSET_BY_OLDER and stored.get(name) is None))
        return spec_differences(stored, attrs, fields)

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
        return None if cls._differences(stored, attrs) else stored

    @classmethod
    def _open_store(cls, path: str | Path, attrs: dict[str, Any], *, overwrite: bool, create: bool,
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
            diffs = cls._differences(stored, attrs)
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
    def _resume_existing(cls, location: str | Path, stored: dict[str, Any] | None, attrs: dict[str, Any],
                         overwrite: bool) -> bool:
        """For a non-empty target: True to resume it as it is (an unfinished store of the same spec), False
        when it may be replaced (`overwrite`); CacheError otherwise (never for something not a Zarr store)."""
        if stored is None:
            raise CacheError(f"{location} is not empty and is not a Zarr store; refusing to write {cls.CONTENTS} "
                             f"into it even with --overwrite. Choose a new or empty {cls.OUT_HINT}.")
        resumable = stored.get("format") == cls.FORMAT and not stored.get("complete", False)
        diffs = cls._differences(stored, attrs)
        if resumable and not diffs:
            return True
        if not overwrite:
            raise CacheError(cls._refusal(location, stored, resumable, attrs))
        return False

    @classmethod
    def _refusal(cls, path: str | Path, stored: dict[str, Any], resumable: bool, attrs: dict[str, Any]) -> str:
        """Why an existing store cannot be reused (what differs from this run, and what it was made from), and
        what to do."""
        if resumable and stored.get("format_version") != attrs.get("format_version"):
            return (f"{path} holds an unfinished {cls.NOUN} of format version {stored.get('format_version')}, started "
                    f"by an older revq-pipe; this one writes version {attrs.get('format_version')} and cannot resume "
                    "it: pass --overwrite to start it again")
        changes = "; ".join(cls._differences(stored, attrs)) or "no setting"
        if resumable:
            return (f"{path} holds an unfinished {cls.NOUN} started with other settings (stored -> now: {changes}); "
                    "rerun with the original settings to resume it, or pass --overwrite to discard it")
        if stored.get("format") == cls.FORMAT:
            source = f", made from {stored['source']}" if stored.get("source") else ""
            return (f"{path} already holds {cls._describe_complete(stored)}{source}, which differs from what this "
                    f"run would write (stored -> now: {changes}); pass --overwrite to replace it, or choose another "
                    f"{cls.OUT_HINT}")
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

    def missing_units(self) -> list[int]:
        """Every unit not staged yet, in order (one listing of the staging prefix)."""
        staged = self._staged_units()
        return [u for u in range(self.num_units) if u not in staged]

    def pending_units(self, rank: int = 0, world_size: int = 1, missing: list[int] | None = None) -> list[int]:
        """This rank's share of the units still to stage: every world_size-th of `missing` (default: listed
        now), so that what a partial run left is spread evenly over the ranks of the next one. Ranks must
        share one listing (rank 0's), or two listings made at different moments could leave a unit to nobody.
        """
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        return (self.missing_units() if missing is None else missing)[rank::world_size]

    def _stage(self, u: int, arrays: dict[str, np.ndarray]) -> None:
        """Write unit u's arrays as one staging part, atomically (a renamed temporary file, or one PUT).

        The ROW_ARRAYS go first and the small summary members last, so that reading the summaries is one
        ranged read from the end of the part (where the zip directory is too).
        """
        rows = [name for name in self.ROW_ARRAYS if name in arrays]
        ordered = {**{name: arrays[name] for name in rows}, **{k: v for k, v in arrays.items() if k not in rows}}
        buffer = io.BytesIO()
        np.savez(buffer, **ordered)
        storage.write_bytes_atomic(self._unit_file(u), buffer.getbuffer(), self.options)

    def _unit_file(self, u: int) -> str | Path:
        return storage.join(self._staging, f"unit_{u:06d}.npz")

    def _staged_units(self) -> set[int]:
        """The staged units in range, by one listing of the staging prefix."""
        return {u for u in staged_unit_ids(self.path, self.options) if u < self.num_units}

    # ---- phase two: assembly --------------------------------------------------------------------

    def _require_all_staged(self, hint: str) -> None:
        """CacheError naming the missing units unless every unit is staged; `hint` says what to do."""
        missing = self.missing_units()
        if missing:
            raise CacheError(f"{len(missing)} of {self.num_units} units of {self.path} are not written yet "
                             f"(first missing: {missing[:5]}); {hint}")

    def _load_unit(self, u: int):
        """Unit u's staged arrays (an NpzFile; use it as a context manager)."""
        return np.load(io.BytesIO(storage.read_bytes(self._unit_file(u), self.options)), allow_pickle=False)

    def _unit_summary(self, u: int) -> dict[str, np.ndarray]:
        """Unit u's members other than its ROW_ARRAYS, read without reading the rows."""
        with storage.open_for_reading(self._unit_file(u), self.options) as handle:
            with np.load(handle, allow_pickle=False) as part:
                return {name: part[name] for name in part.files if name not in self.ROW_ARRAYS}

    def _summarize_blocks(self, collective: Collective, summarize: Callable[[range], Any]) -> list[Any]:
        """summarize(units) of every block of STATS_BLOCK_UNITS units, in block order, on every rank: each
        rank summarizes a contiguous share of the blocks, then the ranks exchange them."""
        blocks = [range(start, min(start + STATS_BLOCK_UNITS, self.num_units))
                  for start in range(0, self.num_units, STATS_BLOCK_UNITS)]
        lo, hi = rank_slice(len(blocks), collective.rank, collective.world_size)
        _, shares = run_everywhere(collective, lambda: [summarize(blocks[b]) for b in range(lo, hi)])
        return [summary for share in shares for summary in share]

    def _inputs_summary(self, units: range, parts: list[dict[str, np.ndarray]]) -> dict[str, list]:
        """What a block summary holds for every writer: the rows (readable inputs) of each of the consecutive
        `units` and their skipped inputs' keys and reasons, from the units' summaries `parts`."""
        skipped = [part["skipped_keys"].tolist() for part in parts]
        return {"rows": [len(range(*self.unit_range(u))) - len(keys) for u, keys in zip(units, skipped)],
                "skipped_keys": [key for keys in skipped for key in keys],
                "skipped_reasons": [reason for part in parts for reason in part["skipped_reasons"].tolist()]}

    @staticmethod
    def _inputs_of_blocks(blocks: list[dict[str, Any]]) -> tuple[list[int], list[str], list[str]]:
        """(rows of every unit, skipped keys, skipped reasons) in unit order, from the block summaries."""
        rows, keys, reasons = ([item for block in blocks for item in block[name]]
                               for name in ("rows", "skipped_keys", "skipped_reasons"))
        return rows, keys, reasons

    def _assemble_rows(self, collective: Collective, unit_inputs: list[int],
                       create_arrays: Callable[[zarr.Group], dict[str, zarr.Array]],
                       to_rows: RowMaker | None = None, rows_per_input: int = 1) -> zarr.Group:
        """Rank 0 creates the final row arrays (`create_arrays(group)`), then every rank writes its share of their
        chunks (`_write_rows`); returns the store's group."""
        _, created = run_everywhere(collective, lambda: list(create_arrays(self._open_group("r+")))
                                    if collective.rank == 0 else None)
        group = self._open_group("r+")
        run_everywhere(collective, lambda: self._write_rows({name: group[name] for name in created[0]}, unit_inputs,
                                                            collective, to_rows, rows_per_input), share=False)
        return group

    def _write_rows(self, arrays: dict[str, zarr.Array], unit_inputs: list[int], collective: Collective,
                    to_rows: RowMaker | None = None, rows_per_input: int = 1) -> None:
        """This rank's contiguous share of whole chunks of the final row `arrays`, from the staged units that cover
        them. Unit u holds unit_inputs[u] inputs (the rows of its ROW_ARRAYS), placed in unit order; a chunk holds
        chunk_size inputs. Each input becomes `rows_per_input` rows of `arrays`, made by `to_rows` from the
        ROW_ARRAYS of consecutive inputs (default: the ROW_ARRAYS themselves, one row per input)."""
        offsets = np.concatenate([[0], np.cumsum(unit_inputs, dtype=np.int64)])  # unit u: [offsets[u], offsets[u+1])
        total, inputs_per_chunk = int(offsets[-1]), self.chunk_size
        lo, hi = rank_slice(-(-total // inputs_per_chunk), collective.rank, collective.world_size)
        last = (None, None)  # (unit, its arrays): consecutive write blocks share at most their boundary unit
        for first_chunk in range(lo, hi, WRITE_BLOCK_CHUNKS):
            start = first_chunk * inputs_per_chunk
            stop = min(min(first_chunk + WRITE_BLOCK_CHUNKS, hi) * inputs_per_chunk, total)
            pieces: dict[str, list[np.ndarray]] = {name: [] for name in self.ROW_ARRAYS}
            first_unit = int(np.searchsorted(offsets, start, side="right")) - 1
            for u in range(first_unit, int(np.searchsorted(offsets, stop, side="left"))):
                if last[0] != u:
                    with self._load_unit(u) as part:
                        last = (u, {name: part[name] for name in self.ROW_ARRAYS})
                a, b = max(start, offsets[u]) - offsets[u], min(stop, offsets[u + 1]) - offsets[u]
                for name in self.ROW_ARRAYS:
                    pieces[name].append(last[1][name][a:b])
            members = {name: np.concatenate(parts) for name, parts in pieces.items()}
            rows = members if to_rows is None else to_rows(members)
            for name, array in arrays.items():
                array[start * rows_per_input:stop * rows_per_input] = rows[name]

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
