"""Read a latent cache: validate its manifest, load it whole, or read any rows of it.

A cache is a local directory or a URL (s3://..., any fsspec scheme; `options` are the fsspec
storage options, None = the standard places). A URL is read through Zarr's FsspecStore and never
taken for a local path. `load_latents` reads a whole split in chunk-aligned blocks on a pool of
threads (many requests in flight, which is what an object store needs) and reports progress in
bytes through an optional callback.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zarr

from revq_pipe.cache import storage
from revq_pipe.cache.schema import FORMAT, FORMAT_VERSION, CacheError, CacheManifest
from revq_pipe.cache.staging import as_location, read_store_attrs, staged_unit_ids
from revq_pipe.pipeline.vae_identity import VaeMismatchError, require_same_vae

_LOAD_BLOCK_ROWS = 16384  # rows read per step by load_latents (bounds the host copy when loading onto a GPU)
_REMOTE_BLOCK_BYTES = 16 * 2**20  # target bytes per block when loading from a URL (one thread reads one block)
LOAD_THREADS = 8  # blocks read concurrently when loading a split from a URL


class LatentCache:
    """A latent cache opened for reading; create it with `LatentCache.open`."""

    def __init__(self, path: str | Path, group: zarr.Group, manifest: CacheManifest,
                 options: dict[str, Any] | None = None) -> None:
        self.path = path  # a Path for a local cache, the URL string otherwise
        self.options = options
        self.manifest = manifest
        self._group = group

    @property
    def is_remote(self) -> bool:
        return not isinstance(self.path, Path)

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = True,
             options: dict[str, Any] | None = None) -> "LatentCache":
        """Open and validate the cache at path (local or URL); CacheError names the path and what to do."""
        path = as_location(path)
        if isinstance(path, Path):
            found = (path / "zarr.json").is_file()
        else:
            found = read_store_attrs(path, options) is not None
        if not found:
            raise CacheError(f"no latent cache at {path}; create it with `revq-pipe encode` "
                             "(or `revq-pipe cache import`), or fix the path")
        try:
            store = path if isinstance(path, Path) else storage.zarr_store(path, "r", options)
            group = zarr.open_group(store, mode="r")
        except Exception as err:  # zarr raises several types for unreadable metadata
            raise CacheError(f"{path} is not a readable Zarr group ({err}); rebuild it with "
                             "`revq-pipe encode --overwrite`") from err
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{path} is not a latent cache (format={attrs.get('format')!r}, expected "
                             f"{FORMAT!r}); point at a store written by `revq-pipe encode`")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path} has cache format version {attrs.get('format_version')!r}, this revq-pipe "
                             f"reads version {FORMAT_VERSION}; re-encode it with `revq-pipe encode --overwrite` "
                             "or use the matching revq-pipe version")
        try:
            manifest = CacheManifest.from_attrs(attrs)
        except CacheError as err:
            raise CacheError(f"{path}: {err}; rebuild it with `revq-pipe encode --overwrite`") from None
        if require_complete and not manifest.complete:
            raise CacheError(f"the latent cache at {path} is incomplete (its encoding was interrupted); "
                             "rerun `revq-pipe encode` with the same arguments to resume it")
        if manifest.complete:
            shape = (manifest.num_samples, *manifest.latent_shape)
            if group["latents"].shape != shape:
                raise CacheError(f"{path}: latents have shape {group['latents'].shape} but the manifest says "
                                 f"{shape}; the store is damaged, rebuild it with `revq-pipe encode --overwrite`")
        return cls(path, group, manifest, options)

    # ---- metadata -------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.latent_shape)

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def mean(self) -> torch.Tensor:
        """Per-element population mean, float32 (C, H, W)."""
        return torch.from_numpy(np.asarray(self._group["mean"][...], dtype=np.float32))

    @property
    def std(self) -> torch.Tensor:
        """Per-element population standard deviation, float32 (C, H, W)."""
        return torch.from_numpy(np.asarray(self._group["std"][...], dtype=np.float32))

    def statistics_sha256(self) -> str:
        """A digest of the stored mean and std: what tells two caches of the same size apart cheaply."""
        digest = hashlib.sha256()
        for name in ("mean", "std"):
            digest.update(np.ascontiguousarray(self._group[name][...], dtype=np.float32).tobytes())
        return digest.hexdigest()

    def labels(self) -> np.ndarray:
        """Class ids (N,) int32, -1 when unknown."""
        return np.asarray(self._group["labels"][...], dtype=np.int32)

    def keys(self) -> list[str]:
        """Source sample keys, in storage order."""
        return [str(k) for k in self._group["keys"][...].tolist()]

    def check_matches(self, vae_identity: dict[str, Any], latent_shape: tuple[int, ...], *, what: str,
                      fix: str, allow_unknown: bool = True) -> None:
        """Raise CacheError unless this cache holds `latent_shape` latents of the VAE `vae_identity`.

        `what` names the other party in the message ("the tokenizer", "the train cache at X").
        """
        if self.latent_shape != tuple(latent_shape):
            raise CacheError(f"{self.path} holds latents of shape {self.latent_shape} but {what} expects "
                             f"{tuple(latent_shape)}; {fix}")
        try:
            require_same_vae(vae_identity, self.manifest.vae, expected_what=what, found_what=f"the cache at {self.path}",
                             fix=fix, allow_unknown=allow_unknown)
        except VaeMismatchError as error:
            raise CacheError(str(error)) from None

    def check_compatible(self, other: "LatentCache") -> None:
        """Raise CacheError unless `other` was made by the same VAE with the same latent shape."""
        unnamed = [c.path for c in (self, other) if not c.manifest.vae.get("weights_sha256")]
        fix = ("encode both splits at the same resolution with the same VAE" if not unnamed else
               f"{unnamed[0]} was imported without naming its VAE: re-import it with `revq-pipe cache import ... "
               "--vae PATH_OR_ID` (the VAE that made those latents), or encode both splits with one VAE")
        other.check_matches(self.manifest.vae, self.latent_shape, what=f"the cache at {self.path}", fix=fix,
                            allow_unknown=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the latents in memory, in the stored dtype."""
        array = self._group["latents"]
        return int(np.prod(array.shape)) * array.dtype.itemsize

    # ---- data -----------------------------------------------------------------------------------

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Latents [start, stop) as float32 (n, C, H, W) on the CPU, in storage order."""
        if not 0 <= start <= stop <= self.num_samples:
            raise ValueError(f"rows [{start}, {stop}) are outside the {self.num_samples} latents of {self.path}")
        return torch.from_numpy(np.asarray(self._group["latents"][start:stop], dtype=np.float32))

    def load_latents(self, device: str | torch.device = "cpu", *,
                     progress: Callable[[int], None] | None = None, threads: int | None = None) -> torch.Tensor:
        """The whole split as one (N, C, H, W) tensor in the stored dtype, on `device`.

        Reads chunk-aligned blocks; from a URL `threads` (default LOAD_THREADS) blocks at a time, each
        also fetching its chunks concurrently, from a local store one block at a time. `progress`, if
        given, is called with the bytes (in the stored dtype) of each block as it lands.
        """
        array = self._group["latents"]
        out = torch.empty(array.shape, dtype=_torch_dtype(array.dtype), device=device)
        chunk = array.chunks[0]
        if threads is None:
            threads = LOAD_THREADS if self.is_remote else 1
        if threads > 1:
            row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
            step = max(1, min(_LOAD_BLOCK_ROWS, _REMOTE_BLOCK_BYTES // max(row_bytes, 1)) // chunk) * chunk
        else:
            step = max(1, _LOAD_BLOCK_ROWS // chunk) * chunk
        starts = range(0, array.shape[0], step)

        def read(start: int) -> tuple[int, np.ndarray]:
            return start, np.ascontiguousarray(array[start:start + step])

        def place(start: int, data: np.ndarray) -> None:
            out[start:start + data.shape[0]].copy_(torch.from_numpy(data))
            if progress is not None:
                progress(data.nbytes)

        if threads <= 1:
            for start in starts:
                place(*read(start))
            return out
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="revq-load") as pool:
            for start, data in pool.map(read, starts):  # in order; `threads` blocks in flight
                place(start, data)
        return out

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Latents at the given row indices (n,), in that order, in the stored dtype (n, C, H, W).

        One orthogonal read of the sorted rows: Zarr fetches (and decompresses) each chunk they touch once.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and not (0 <= rows.min() and rows.max() < self.num_samples):
            raise ValueError(f"rows range over [{rows.min()}, {rows.max()}], outside the {self.num_samples} "
                             f"latents of {self.path}")
        order = np.argsort(rows, kind="stable")
        array = self._group["latents"]
        out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        if len(rows):
            out[order] = array.oindex[rows[order]]
        return out


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}[np.dtype(dtype)]


def _tree_bytes(location: str | Path, options: dict[str, Any] | None) -> int:
    """Total size of the files (objects) below a local folder or URL prefix."""
    if isinstance(location, Path):
        return sum(f.stat().st_size for f in location.rglob("*") if f.is_file())
    fs, key = storage.filesystem(location, options)
    fs.invalidate_cache(key)
    try:
        return int(sum(info["size"] for info in fs.find(key, detail=True).values()))
    except FileNotFoundError:
        return 0


def cache_info(path: str | os.PathLike, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Manifest plus a statistics and storage summary, for `revq-pipe cache info` (local path or URL).

    Works on unfinished caches too (then `complete` is false and `units_staged` says how far it got).
    """
    cache = LatentCache.open(path, require_complete=False, options=options)
    info: dict[str, Any] = {"path": str(cache.path), **cache.manifest.to_attrs()}
    bytes_on_disk = _tree_bytes(cache.path, options)
    info["bytes_on_disk"] = bytes_on_disk
    if not cache.manifest.complete:
        info["units_staged"] = len(staged_unit_ids(cache.path, options))
        info["units_total"] = -(-cache.manifest.num_inputs // cache.manifest.chunk_size)
        return info
    latents = cache._group["latents"]
    mean, std = cache.mean.double(), cache.std.double()
    labels = cache.labels()
    latent_bytes = _tree_bytes(storage.join(cache.path, "latents"), options)
    raw_float32 = latents.size * 4
    info["statistics"] = {
        "mean_of_mean": float(mean.mean()), "mean_of_std": float(std.mean()),
        "min_std": float(std.min()), "max_std": float(std.max()),
    }
    info["labels"] = {"num_classes": int(len(np.unique(labels[labels >= 0]))),
                      "unknown": int((labels < 0).sum())}
    info["storage"] = {
        "num_chunks": int(np.prod(latents.cdata_shape)), "chunk_shape": list(latents.chunks),
        "latent_bytes_on_disk": latent_bytes,
        "bytes_per_sample": latent_bytes / max(cache.num_samples, 1),
        "compression_ratio": latents.size * latents.dtype.itemsize / max(latent_bytes, 1),
        "fraction_of_raw_float32": latent_bytes / raw_float32,
    }
    return info
