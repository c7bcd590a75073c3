"""A Zarr store of token ids for a whole split: what generative models train on.

One row per view of every image (V views: 1 without augmentation, 2 with flip, 10 with ten-crop;
pipeline/views.py), image by image, so rows [i V, (i + 1) V) are the views of image i:

    ids     (N V, T)  uint16 when K <= 65536, else int32   one codebook index per token position
    labels  (N V,)    int32                                class id, -1 when unknown
    keys    (N V,)    string                               source sample key (the same for an image's views)
    views   (N V,)    uint8                                which view (an index into attrs augment.views)

Group attributes: format "revq-token-store", the token layout (T, d, K, latent shape and which
latent channel/rows/columns each position covers), the augmentation (`augment`: name, view names,
resolutions), the tokenizer identity (its directory and a hash of model.safetensors), the VAE
identity, where the ids came from, `num_images`, `num_samples` (rows), skipped inputs, and
`complete`, set last.

A token id means (position, code): id k at position t is codebook[t, k]. `flat_ids` maps it to one
shared vocabulary of T K entries (t K + k), and `per_position_ids` back.

Writing is two-phase and resumable like the latent cache (cache/staging.py): units of
`chunk_size` consecutive inputs are staged atomically (one object each, also on an object store) as
STORE/_staging/unit_*.npz by whichever rank owns them, then every rank assembles a share of the final
arrays' chunks in unit order, so any number of ranks writes the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from revq_pipe.cache import storage
from revq_pipe.cache.collective import SINGLE_PROCESS, Collective, run_everywhere
from revq_pipe.cache.schema import CacheError, small_compressors
from revq_pipe.cache.staging import StagedWriter, as_location, read_store_attrs
from revq_pipe.pipeline.version import package_version

TOKEN_FORMAT = "revq-token-store"
TOKEN_FORMAT_VERSION = 2  # 2: one row per view (views array, augment attribute)


def ids_dtype(codebook_size: int) -> str:
    """The smallest stored dtype that holds every id of a K-entry codebook."""
    return "uint16" if codebook_size <= 2**16 else "int32"


def flat_ids(ids: np.ndarray, codebook_size: int) -> np.ndarray:
    """Per-position ids (..., T) -> one shared vocabulary of T K ids: t K + id, in the smallest dtype holding T K."""
    ids = np.asarray(ids)
    num_tokens = ids.shape[-1]
    if ids.size and (ids.min() < 0 or ids.max() >= codebook_size):
        raise ValueError(f"ids range over [{ids.min()}, {ids.max()}], outside the codebook [0, {codebook_size})")
    offsets = np.arange(num_tokens, dtype=np.int64) * codebook_size  # (T,)
    return (ids.astype(np.int64) + offsets).astype(ids_dtype(num_tokens * codebook_size))


def per_position_ids(flat: np.ndarray, codebook_size: int) -> np.ndarray:
    """The inverse of `flat_ids`: flat ids (..., T) -> per-position ids, refusing an id of another position."""
    flat = np.asarray(flat).astype(np.int64)
    offsets = np.arange(flat.shape[-1], dtype=np.int64) * codebook_size  # (T,)
    ids = flat - offsets
    if ids.size and (ids.min() < 0 or ids.max() >= codebook_size):
        wrong = np.argwhere((ids < 0) | (ids >= codebook_size))[0]
        raise ValueError(f"flat id {int(flat[tuple(wrong)])} at position {int(wrong[-1])} belongs to position "
                         f"{int(flat[tuple(wrong)]) // codebook_size}; flat ids at position t lie in "
                         f"[t K, (t + 1) K) with K = {codebook_size}")
    return ids.astype(ids_dtype(codebook_size))


class TokenWriter(StagedWriter):
    """Writes one split's token store; create it with `TokenWriter.open`."""

    FORMAT = TOKEN_FORMAT
    NOUN = "token store"
    CONTENTS = "tokens"
    OUT_HINT = "--out"
    SPEC_FIELDS = ("format_version", "split", "num_inputs", "chunk_size", "num_tokens", "codebook_size",
                   "ids_dtype", "layout", "augment", "tokenizer", "vae", "source")
    ROW_ARRAYS = ("ids", "labels", "keys")

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
        augment: dict[str, Any],
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
            augment: the views of every image (pipeline.views.ViewSet.describe(): "name", "views", ...).
            chunk_size: inputs per work unit and rows per Zarr chunk.
            overwrite: replace a complete store, or an unfinished one with another spec.
            create: True on rank 0 only; other ranks pass False after a barrier and attach.
            options: fsspec storage options for a URL; None = the standard places.
        """
        path = as_location(path)
        spec = cls._spec(num_inputs=num_inputs, split=split, num_tokens=num_tokens, codebook_size=codebook_size,
                         layout=layout, tokenizer=tokenizer, vae=vae, source=source, augment=augment,
                         chunk_size=chunk_size)
        cls._open_store(path, spec, overwrite=overwrite, create=create, options=options)
        return cls(path, spec, options)

    @classmethod
    def completed(cls, path: str | os.PathLike, options: dict[str, Any] | None = None,
                  **spec: Any) -> dict[str, Any] | None:
        """The attributes of a complete store at `path` made with exactly this spec (open's arguments), else None."""
        return cls._completed_attrs(path, cls._spec(**spec), options)

    @staticmethod
    def _spec(*, num_inputs: int, split: str, num_tokens: int, codebook_size: int, layout: dict[str, Any],
              tokenizer: dict[str, Any], vae: dict[str, Any], source: dict[str, Any], augment: dict[str, Any],
              chunk_size: int = 1024) -> dict[str, Any]:
        """The store's attributes before it is finished (JSON values only)."""
        if num_inputs < 1 or chunk_size < 1:
            raise ValueError(f"num_inputs={num_inputs}, chunk_size={chunk_size}: need at least one input "
                             "and a positive chunk size; check the image source")
        if not augment.get("views") or len(augment["views"]) > 255:
            raise ValueError(f"augment={augment!r} must name between 1 and 255 views (the views array is uint8)")
        spec = {"format": TOKEN_FORMAT, "format_version": TOKEN_FORMAT_VERSION, "complete": False,
                "split": split, "num_inputs": int(num_inputs), "chunk_size": int(chunk_size),
                "num_tokens": int(num_tokens), "codebook_size": int(codebook_size),
                "ids_dtype": ids_dtype(codebook_size), "layout": layout, "augment": augment,
                "tokenizer": tokenizer, "vae": vae, "source": source, "num_images": 0, "num_samples": 0,
                "package_version": package_version()}
        return json.loads(json.dumps(spec))  # tuples -> lists, so a stored spec compares equal

    @classmethod
    def _describe_complete(cls, stored: dict[str, Any]) -> str:
        return f"a complete token store of {stored.get('num_images', stored.get('num_samples'))} images"

    @property
    def num_views(self) -> int:
        return len(self.attrs["augment"]["views"])

    def write_unit(self, u: int, ids: np.ndarray, labels: np.ndarray, keys: Sequence[str],
                   skipped: Sequence[tuple[str, str]] = ()) -> None:
        """Stage unit u atomically: ids (n, V, T) of its readable inputs' views in input order, labels (n,),
        keys, skipped."""
        start, stop = self.unit_range(u)
        ids, labels = np.asarray(ids), np.asarray(labels)
        n, V, T, K = len(keys), self.num_views, self.attrs["num_tokens"], self.attrs["codebook_size"]
        if ids.shape != (n, V, T) or labels.shape != (n,) or n + len(skipped) != stop - start:
            raise ValueError(f"unit {u}: ids {ids.shape}, labels {labels.shape}, {n} keys and {len(skipped)} "
                             f"skipped do not describe the unit's {stop - start} inputs with {V} views of {T} "
                             "tokens each")
        if n and (ids.min() < 0 or ids.max() >= K):
            raise ValueError(f"unit {u}: ids range over [{ids.min()}, {ids.max()}], outside the codebook [0, {K})")
        arrays = {"ids": ids.astype(self.attrs["ids_dtype"]), "labels": labels.astype(np.int32),
                  "keys": np.array(list(keys), dtype=str),
                  "skipped_keys": np.array([k for k, _ in skipped], dtype=str),
                  "skipped_reasons": np.array([r for _, r in skipped], dtype=str)}
        self._stage(u, arrays)

    def finalize(self, collective: Collective = SINGLE_PROCESS) -> dict[str, Any]:
        """Assemble one row per view (ids, labels, keys, views) in unit order, once every unit is staged; every
        rank of `collective` calls it together (each writes a share of the chunks) and gets the attrs."""
        run_everywhere(collective, lambda: self._require_all_staged("rerun with the same arguments to finish them"),
                       share=False)
        blocks = self._summarize_blocks(collective, lambda units: self._inputs_summary(
            units, [self._unit_summary(u) for u in units]))
        unit_images, skipped_keys, skipped_reasons = self._inputs_of_blocks(blocks)
        num_images = sum(unit_images)
        if num_images == 0:
            raise CacheError(f"all {self.num_inputs} inputs for {self.path} were skipped; nothing to store. "
                             "Check the image source.")
        group = self._assemble_rows(collective, unit_images, lambda group: self._create_arrays(group, num_images),
                                    to_rows=self._rows_of_views, rows_per_input=self.num_views)
        attrs = {**self.attrs, "num_images": num_images, "num_samples": num_images * self.num_views,
                 "skipped": {"count": len(skipped_keys), "keys": skipped_keys, "reasons": skipped_reasons}}
        run_everywhere(collective, lambda: self._mark_complete(group, attrs) if collective.rank == 0 else None,
                       share=False)
        return {**attrs, "complete": True}

    def _create_arrays(self, group: zarr.Group, num_images: int) -> dict[str, zarr.Array]:
        """Empty final arrays of one row per view, chunked chunk_size images (chunk_size * V rows) at a time."""
        rows, cs = num_images * self.num_views, self.chunk_size * self.num_views
        shapes = {"ids": ((rows, self.attrs["num_tokens"]), self.attrs["ids_dtype"]), "labels": ((rows,), "int32"),
                  "keys": ((rows,), str), "views": ((rows,), "uint8")}
        return {name: group.create_array(name, shape=shape, chunks=(cs, *shape[1:]), dtype=dtype,
                                         compressors=small_compressors(), overwrite=True)
                for name, (shape, dtype) in shapes.items()}

    def _rows_of_views(self, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The staged members of consecutive images -> their rows, one per view, image by image."""
        n, V = len(images["keys"]), self.num_views
        return {"ids": images["ids"].reshape(n * V, -1),  # (n, V, T) -> (n V, T)
                "labels": np.repeat(images["labels"], V), "keys": np.repeat(images["keys"], V),
                "views": np.tile(np.arange(V, dtype=np.uint8), n)}


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
        """Rows: one per view of every image."""
        return int(self.attrs["num_samples"])

    @property
    def num_images(self) -> int:
        return int(self.attrs["num_images"])

    @property
    def view_names(self) -> list[str]:
        return list(self.attrs["augment"]["views"])

    @property
    def num_tokens(self) -> int:
        return int(self.attrs["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.attrs["codebook_size"])

    def ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids (rows, T) of rows [start, stop) (all by default), in the stored dtype."""
        return np.asarray(self._group["ids"][start:stop])

    def views(self) -> np.ndarray:
        """Which view each row is (rows,), an index into `view_names`."""
        return np.asarray(self._group["views"][...], dtype=np.int64)

    def labels(self) -> np.ndarray:
        return np.asarray(self._group["labels"][...], dtype=np.int32)

    def keys(self) -> list[str]:
        return [str(k) for k in self._group["keys"][...].tolist()]
