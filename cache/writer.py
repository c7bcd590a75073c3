"""Two-phase, resumable, multi-rank writer of a latent cache.

Phase one: the inputs are cut into work units of `chunk_size` consecutive indices. Whoever encodes
unit u (rank u % world_size) hands its latents to `write_unit`, which writes one staging part,
STORE/_staging/unit_000123.npz, in one atomic write (a renamed temporary file locally, one PUT on
an object store; see cache/staging.py and cache/storage.py). A unit is either
fully there or absent, so a killed run started again with the same arguments skips what is
staged and redoes only the rest.

Phase two: `finalize` (every rank at once, once every unit is staged) merges the per-unit float64
statistics and skipped keys in a fixed tree over the units, and the ranks copy the good samples in
unit order into whole chunks of the final Zarr arrays, each rank a contiguous share of the chunks
(cache/staging.py). Rank 0 writes the statistics and the manifest, sets `complete` last and removes the
staging parts. Because rows and merges follow the units, never the ranks, any world size writes the
same bytes. A crash inside finalize leaves the staging parts and `complete` false, so running finalize
again starts it over.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np
import zarr

from revq_pipe.cache.collective import SINGLE_PROCESS, Collective, run_everywhere
from revq_pipe.cache.schema import FORMAT, LATENT_DTYPES, CacheError, CacheManifest, latent_compressors, small_compressors
from revq_pipe.cache.staging import StagedWriter, as_location
from revq_pipe.cache.stats import MomentAccumulator

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CacheWriter(StagedWriter):
    """Writes one split's latent cache; create it with `CacheWriter.open`."""

    FORMAT = FORMAT
    NOUN = "latent cache"
    CONTENTS = "a cache"
    SPEC_FIELDS = ("format_version", "split", "num_inputs", "latent_shape", "latent_dtype", "chunk_size", "vae", "image",
                   "source")
    UNSET_BY_OLDER = ("source",)  # older versions recorded it at finalize only
    ROW_ARRAYS = ("latents", "labels", "keys")

    def __init__(self, path: str | os.PathLike, manifest: CacheManifest,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(path, manifest.num_inputs, manifest.chunk_size, options)
        self.manifest = manifest  # complete=False, num_samples=0 until finalize

    # ---- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        num_inputs: int,
        latent_shape: Sequence[int],
        split: str,
        vae_identity: dict[str, Any],
        image_recipe: dict[str, Any],
        source: str | None,
        chunk_size: int = 256,
        latent_dtype: str = "float16",
        overwrite: bool = False,
        create: bool = True,
        options: dict[str, Any] | None = None,
    ) -> "CacheWriter":
        """Create a new store, or resume an unfinished one written with the identical spec.

        Args:
            path: the Zarr store: a local directory or a URL (s3://bucket/prefix/train.zarr, any fsspec
                scheme); a URL is never taken for a local path.
            num_inputs: number of inputs to encode (samples plus those that will be skipped).
            latent_shape: (C, H, W) of one latent.
            split: split name recorded in the store.
            vae_identity: {"source", "class", "weights_sha256"} of the encoder.
            image_recipe: preprocessing recipe {"resolution", "resize", "crop", "value_range"}.
            source: where the inputs come from (the images' path or URL), so that later commands find the
                images of a cached split and a store of other inputs is never taken for this one; None for
                latents that come from no image source (an import).
            chunk_size: inputs per work unit and rows per Zarr chunk.
            latent_dtype: "float16" (default) or "float32".
            overwrite: replace a complete cache, or an unfinished one with a different spec.
            create: True on rank 0 only. Other ranks pass False after a barrier and just attach
                to the store rank 0 created or resumed.
            options: fsspec storage options for a URL (`storage.storage_options(endpoint_url)`);
                None = the standard places (environment, ~/.aws, ...).

        An unfinished store with the identical spec is resumed (with or without `overwrite`):
        its staged units are exactly what this call would write again.
        """
        path = as_location(path)
        manifest = _validated_manifest(num_inputs, latent_shape, split, vae_identity, image_recipe, source,
                                       chunk_size, latent_dtype)
        cls._open_store(path, manifest.to_attrs(), overwrite=overwrite, create=create, options=options)
        return cls(path, manifest, options)

    @staticmethod
    def completed(path: str | os.PathLike, *, num_inputs: int, latent_shape: Sequence[int], split: str,
                  vae_identity: dict[str, Any], image_recipe: dict[str, Any], source: str | None,
                  chunk_size: int = 256, latent_dtype: str = "float16",
                  options: dict[str, Any] | None = None) -> CacheManifest | None:
        """The manifest of a complete cache at `path` written with exactly `spec`, else None.

        Takes the spec arguments of `open`. Rerunning a finished encode with the same command
        is then a no-op rather than an error.
        """
        wanted = _validated_manifest(num_inputs, latent_shape, split, vae_identity, image_recipe, source,
                                     chunk_size, latent_dtype)
        attrs = CacheWriter._completed_attrs(path, wanted.to_attrs(), options)
        return None if attrs is None else CacheManifest.from_attrs(attrs)

    @classmethod
    def _describe_complete(cls, stored: dict[str, Any]) -> str:
        return f"a complete {stored.get('split')!r} cache of {stored.get('num_samples')} latents"

    # ---- phase one: staging ---------------------------------------------------------------------

    def write_unit(
        self,
        u: int,
        latents: np.ndarray,
        labels: np.ndarray,
        keys: Sequence[str],
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Stage unit u atomically.

        Args:
            u: unit index.
            latents: (n, C, H, W) float latents of the unit's readable inputs, in input order.
            labels: (n,) integer class ids, -1 when unknown.
            keys: n sample keys.
            skipped: (key, reason) for each unreadable input; n + len(skipped) == unit size.
        """
        start, stop = self.unit_range(u)
        stored, labels, keys, skipped = self._validated_unit(u, stop - start, latents, labels, keys, skipped)
        stats = MomentAccumulator()
        stats.update(stored)  # statistics of the values as stored, not as encoded
        arrays = {
            "latents": stored,
            "labels": labels,
            "keys": np.array(keys, dtype=str),
            "skipped_keys": np.array([k for k, _ in skipped], dtype=str),
            "skipped_reasons": np.array([r for _, r in skipped], dtype=str),
        }
        arrays.update({f"stats_{k}": v for k, v in stats.state_dict().items()})
        self._stage(u, arrays)

    # ---- phase two: assembly --------------------------------------------------------------------

    def finalize(self, ignored: Sequence[str] = (), collective: Collective = SINGLE_PROCESS) -> CacheManifest:
        """Assemble the final arrays from every staged unit; every rank of `collective` calls it together and
        gets the manifest.

        `ignored` names the source's files that were no inputs (not images).
        """
        run_everywhere(collective, lambda: self._require_all_staged(
            "finish encoding them (rerun with the same arguments) before finalize"), share=False)

        # every unit's row count, the statistics and the skipped keys, merged units-in-blocks then blocks
        blocks = self._summarize_blocks(collective, self._block_summary)
        unit_rows, skipped_keys, skipped_reasons = self._inputs_of_blocks(blocks)
        stats = MomentAccumulator()
        for block in blocks:
            stats.merge(MomentAccumulator.from_state_dict(block["stats"]))
        if stats.count == 0:
            raise CacheError(f"all {self.num_inputs} inputs for {self.path} were skipped (first: "
                             f"{skipped_keys[0]!r}: {skipped_reasons[0]}); nothing to cache. Check the image source.")

        # the final arrays: rank 0 creates them, then every rank writes its share of their chunks
        group = self._assemble_rows(collective, unit_rows, lambda group: self._create_arrays(group, stats.count))

        # statistics and the manifest last, and `complete` after everything else (rank 0: small writes)
        manifest = CacheManifest(**{**self.manifest.__dict__, "num_samples": stats.count, "complete": False,
                                    "skipped": {"count": len(skipped_keys), "keys": skipped_keys,
                                                "reasons": skipped_reasons},
                                    "ignored": {"count": len(ignored), "keys": list(ignored)}})
        run_everywhere(collective, lambda: self._finish(group, stats, manifest) if collective.rank == 0 else None,
                       share=False)
        manifest.complete = True
        return manifest

    def _block_summary(self, units: range) -> dict[str, Any]:
        """Row counts, skipped inputs and merged statistics of consecutive units, from their summaries."""
        parts = [self._unit_summary(u) for u in units]
        stats = MomentAccumulator()
        for part in parts:
            stats.merge(MomentAccumulator.from_state_dict(
                {k[len("stats_"):]: v for k, v in part.items() if k.startswith("stats_")}))
        return {**self._inputs_summary(units, parts), "stats": stats.state_dict()}

    def _finish(self, group: zarr.Group, stats: MomentAccumulator, manifest: CacheManifest) -> None:
        group.create_array("mean", data=stats.mean().astype(np.float32), compressors=small_compressors(),
                           overwrite=True)
        group.create_array("std", data=stats.std().astype(np.float32), compressors=small_compressors(),
                           overwrite=True)
        self._mark_complete(group, manifest.to_attrs())

    # ---- helpers --------------------------------------------------------------------------------

    def _create_arrays(self, group: zarr.Group, n: int) -> dict[str, zarr.Array]:
        """Empty final arrays with N rows, chunked `chunk_size` rows at a time."""
        cs, shape, dtype = self.chunk_size, tuple(self.manifest.latent_shape), self.manifest.latent_dtype
        return {
            "latents": group.create_array("latents", shape=(n, *shape), chunks=(cs, *shape), dtype=dtype,
                                          compressors=latent_compressors(dtype), overwrite=True),
            "labels": group.create_array("labels", shape=(n,), chunks=(cs,), dtype="int32",
                                         compressors=small_compressors(), overwrite=True),
            "keys": group.create_array("keys", shape=(n,), chunks=(cs,), dtype=str,
                                       compressors=small_compressors(), overwrite=True),
        }

    def _validated_unit(self, u, size, latents, labels, keys, skipped):
        """Check one unit's inputs and return them as (stored latents, int32 labels, keys, skipped)."""
        where = f"unit {u} (inputs {u * self.chunk_size}..{u * self.chunk_size + size - 1})"
        latents = np.asarray(latents)
        labels = np.asarray(labels)
        keys, skipped = list(keys), [tuple(s) for s in skipped]
        n = len(keys)
        if latents.shape != (n, *self.manifest.latent_shape):
            raise ValueError(f"{where}: latents have shape {latents.shape}, expected "
                             f"{(n, *self.manifest.latent_shape)} (one (C, H, W) latent per key)")
        if not np.issubdtype(latents.dtype, np.floating):
            raise ValueError(f"{where}: latents have dtype {latents.dtype}; pass floating-point latents")
        if labels.shape != (n,) or (n and not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"{where}: labels have shape {labels.shape} and dtype {labels.dtype}; "
                             f"expected {n} integers (-1 when unknown)")
        if n and (labels.min() < -1 or labels.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{where}: labels range over [{labels.min()}, {labels.max()}]; class ids must be "
                             ">= 0, or -1 when unknown, and fit int32")
        if not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{where}: keys must be strings")
        if any(len(s) != 2 or not all(isinstance(x, str) for x in s) for s in skipped):
            raise ValueError(f"{where}: skipped must be a list of (key, reason) string pairs")
        if n + len(skipped) != size:
            raise ValueError(f"{where}: {n} latents + {len(skipped)} skipped != {size} inputs of the unit")
        if not np.isfinite(latents).all():
            raise ValueError(f"{where}: latents contain NaN or infinity; the encoder output is broken")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            stored = latents.astype(self.manifest.latent_dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"{where}: latents reach {np.abs(latents).max():.4g}, beyond the float16 range; "
                             "use latent_dtype='float32' (encode.latent_dtype=float32)")
        return stored, labels.astype(np.int32), keys, skipped


def _validated_manifest(num_inputs, latent_shape, split, vae_identity, image_recipe, source, chunk_size,
                        latent_dtype) -> CacheManifest:
    """Check `CacheWriter.open`'s arguments; ValueError names the value and the fix."""
    if isinstance(num_inputs, bool) or not isinstance(num_inputs, (int, np.integer)) or num_inputs < 1:
        raise ValueError(f"num_inputs={num_inputs!r}: need at least one input to cache; check the image source")
    shape = tuple(latent_shape) if isinstance(latent_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise ValueError(f"latent_shape={latent_shape!r}: expected three positive ints (C, H, W)")
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise ValueError(f"split={split!r}: use a plain name such as 'train' or 'val' (letters, digits, _ . -)")
    if not isinstance(vae_identity, dict) or not {"source", "class", "weights_sha256"} <= set(vae_identity):
        raise ValueError(f"vae_identity={vae_identity!r}: expected a dict with 'source', 'class' and "
                         "'weights_sha256' (FrozenVAE.identity)")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"source={source!r}: expected the images' path or URL as a string, or None")
    if not isinstance(image_recipe, dict):
        raise ValueError(f"image_recipe={image_recipe!r}: expected a dict (pipeline.images.recipe(resolution))")
    for name, value in (("vae_identity", vae_identity), ("image_recipe", image_recipe)):
        try:
            json.dumps(value)
        except TypeError as err:
            raise ValueError(f"{name}={value!r} must hold only JSON values (str, number, bool, None, "
                             f"list, dict): {err}") from None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int (256 is a good default)")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype={latent_dtype!r}: expected one of {LATENT_DTYPES}")
    return CacheManifest(split=split, num_samples=0, latent_shape=tuple(int(s) for s in shape),
                         latent_dtype=latent_dtype, vae=dict(vae_identity), image=dict(image_recipe), source=source,
                         chunk_size=int(chunk_size), num_inputs=int(num_inputs))
