"""Build a latent cache from an (N, C, H, W) tensor made elsewhere, through the regular writer."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revq_pipe.cache.schema import CacheManifest
from revq_pipe.pipeline.vae_identity import unknown_vae_identity
from revq_pipe.cache.writer import CacheWriter

IMPORTED_IMAGE_RECIPE = {"resolution": None, "resize": None, "crop": None, "value_range": None, "note": "imported"}


def sample_key(index: int, num_samples: int) -> str:
    """Key of imported sample `index`: "index:000042" (zero-padded to at least 6 digits)."""
    return f"index:{index:0{max(6, len(str(num_samples - 1)))}d}"


def import_tensor(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str,
    labels_path: str | os.PathLike | None = None,
    vae_identity: dict[str, Any] | None = None,
    overwrite: bool = False,
    chunk_size: int = 256,
    latent_dtype: str = "float16",
    options: dict[str, Any] | None = None,
) -> CacheManifest:
    """Write the latents in `src` (.npy or .pt) as a complete cache at `out`.

    Args:
        src: (N, C, H, W) float latents; .npy (read without pickle, memory-mapped) or .pt (read with
            torch.load(weights_only=True): a tensor, or a dict holding exactly one tensor).
        out: Zarr store to write: a local folder or a URL (s3://..., any fsspec scheme).
        split: split name recorded in the store.
        labels_path: optional N class ids (.npy, .pt, or .txt with one integer per line).
        vae_identity: identity of the VAE that made the latents; unknown (all None) when not given.
        overwrite, chunk_size, latent_dtype: as in CacheWriter.open. An interrupted import resumes
            when run again with the same arguments.
        options: fsspec storage options for a URL `out` (storage.storage_options); None = standard places.

    Sample keys are "index:000000", "index:000001", ... (the row in `src`).
    """
    latents = _load_latents(Path(src))
    n = latents.shape[0]
    labels = _load_labels(Path(labels_path), n) if labels_path is not None else np.full(n, -1, dtype=np.int32)
    writer = CacheWriter.open(out, num_inputs=n, latent_shape=latents.shape[1:], split=split,
                              vae_identity=vae_identity or unknown_vae_identity(),
                              image_recipe=IMPORTED_IMAGE_RECIPE, source=None, chunk_size=chunk_size,
                              latent_dtype=latent_dtype, overwrite=overwrite, create=True, options=options)
    for u in writer.pending_units():
        start, stop = writer.unit_range(u)
        writer.write_unit(u, np.asarray(latents[start:stop], dtype=np.float32), labels[start:stop],
                          [sample_key(i, n) for i in range(start, stop)], [])
    return writer.finalize()


def _load_latents(src: Path) -> np.ndarray:
    """The (N, C, H, W) float array in src, memory-mapped for .npy."""
    array = _load_array(src, what="latents")
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"{src}: latents have shape {tuple(array.shape)}; expected a non-empty (N, C, H, W) array")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{src}: latents have dtype {array.dtype}; expected floating point")
    return array


def _load_labels(path: Path, n: int) -> np.ndarray:
    """N integer class ids from .npy, .pt or .txt (one per line), as int32."""
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"labels file {path} does not exist; fix --labels")
        lines = [line.strip() for line in path.read_text().splitlines()]
        if lines and lines[-1] == "":
            lines.pop()
        try:
            labels = np.array([int(line) for line in lines], dtype=np.int64)
        except ValueError:
            bad = next(i for i, line in enumerate(lines) if not line.lstrip("-").isdigit())
            raise ValueError(f"{path}: line {bad + 1} is {lines[bad]!r}, expected one integer per line") from None
    else:
        labels = np.asarray(_load_array(path, what="labels"))
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{path}: {labels.shape} labels for {n} latents; expected exactly one label per latent")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels have dtype {labels.dtype}; expected integers (-1 when unknown)")
    if n and (labels.min() < -1 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: labels range over [{labels.min()}, {labels.max()}]; expected class ids >= 0 "
                         "or -1 for unknown")
    return labels.astype(np.int32)


def _load_array(path: Path, *, what: str) -> np.ndarray:
    """A numeric array from .npy (no pickle) or .pt (weights_only); never runs pickled code."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; check the path")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:  # object arrays need pickle, which is refused
            raise ValueError(f"{path}: cannot read {what} without pickle ({err}); save a plain numeric array "
                             "with np.save") from None
    if path.suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path}: refused to load {what}: the file holds objects other than tensors, and "
                             "loading them could run code. Save a plain tensor with torch.save(tensor, path). "
                             f"({str(err).splitlines()[0]})") from None
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)] if isinstance(obj, dict) else []
        if isinstance(obj, torch.Tensor):
            tensor = obj
        elif isinstance(obj, dict) and len(obj) == 1 and len(tensors) == 1:
            tensor = tensors[0]
        else:
            found = f"a dict with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: expected a tensor or a dict holding exactly one tensor, found {found}; "
                             f"save the {what} alone with torch.save(tensor, path)")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # numpy has no bfloat16
        return tensor.detach().contiguous().numpy()
    raise ValueError(f"{path}: unsupported {what} file type {path.suffix!r}; use .npy or .pt"
                     + (" or .txt" if what == "labels" else ""))

