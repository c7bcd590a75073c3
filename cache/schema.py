"""The latent cache's on-disk contract: format name, manifest (group attributes) and storage layout.

A cache is one Zarr v3 group per split:

    latents  (N, C, H, W) float16 (float32 on request)   VAE latents, no scaling factor applied
    labels   (N,)         int32                          class id, -1 when unknown
    keys     (N,)         string                         source sample key
    mean/std (C, H, W)    float32                        population statistics, accumulated in float64

and the group attributes written by `CacheManifest.to_attrs`. `complete` is set true last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zarr.codecs import BloscCodec

from revq_pipe.pipeline.version import package_version

FORMAT = "revq-latent-cache"
FORMAT_VERSION = 1
LATENT_DTYPES = ("float16", "float32")
STAGING_DIR = "_staging"  # per-unit parts of an unfinished store; removed when it completes

# Blosc zstd level 5 with byte shuffle: the smallest float16 latents among the codecs tried, at a write speed
# far above what the VAE encodes and reads as fast as the lighter levels; higher levels save little more at
# several times the write cost. The measurements and the command that makes them: docs/cache_codecs.md.
LATENT_CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}


class CacheError(Exception):
    """A latent cache is missing, unfinished, malformed or does not match what the caller expects."""


def latent_compressors(latent_dtype: str) -> list[BloscCodec]:
    """The Zarr codecs for the `latents` array (byte shuffle works on the dtype's item size)."""
    return [BloscCodec(typesize=2 if latent_dtype == "float16" else 4, **LATENT_CODEC)]


def small_compressors() -> list[BloscCodec]:
    """The Zarr codecs for labels, keys and statistics (tiny next to the latents)."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]


@dataclass
class CacheManifest:
    """Everything a cache says about itself, stored as the Zarr group's attributes.

    Args:
        split: split name ("train", "val", ...).
        num_samples: rows in `latents` (inputs minus skipped ones).
        latent_shape: (C, H, W) of one latent.
        latent_dtype: "float16" or "float32".
        vae: identity of the encoder: {"source", "class", "weights_sha256"}.
        image: preprocessing recipe: {"resolution", "resize", "crop", "value_range"}.
        skipped: {"count": n, "keys": [key, ...], "reasons": [reason, ...]} for unreadable inputs.
        ignored: {"count": n, "keys": [...]} for files of the source that are no images (not inputs).
        source: where the inputs came from (the images' path or URL), None for imported latents.
        package_version: revq-pipe version that wrote the cache.
        complete: true only once every array and the statistics are written.
        chunk_size: rows per Zarr chunk of `latents` (also the writer's unit of work).
        num_inputs: inputs the writer was asked to encode (num_samples + skipped count).
    """

    split: str
    num_samples: int
    latent_shape: tuple[int, int, int]
    latent_dtype: str
    vae: dict[str, Any]
    image: dict[str, Any]
    skipped: dict[str, Any] = field(default_factory=lambda: {"count": 0, "keys": [], "reasons": []})
    ignored: dict[str, Any] = field(default_factory=lambda: {"count": 0, "keys": []})
    source: str | None = None
    package_version: str = field(default_factory=package_version)
    complete: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    chunk_size: int = 256
    num_inputs: int = 0

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready group attributes."""
        return {
            "format": self.format,
            "format_version": self.format_version,
            "complete": bool(self.complete),
            "split": self.split,
            "num_samples": int(self.num_samples),
            "num_inputs": int(self.num_inputs),
            "latent_shape": [int(s) for s in self.latent_shape],
            "latent_dtype": self.latent_dtype,
            "chunk_size": int(self.chunk_size),
            "vae": dict(self.vae),
            "image": dict(self.image),
            "skipped": dict(self.skipped),
            "ignored": dict(self.ignored),
            "source": self.source,
            "package_version": self.package_version,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "CacheManifest":
        """Parse group attributes; CacheError names the first missing attribute."""
        required = ("format", "format_version", "complete", "split", "num_samples", "latent_shape",
                    "latent_dtype", "chunk_size", "vae", "image", "skipped", "package_version")
        for name in required:
            if name not in attrs:
                raise CacheError(f"attribute {name!r} is missing from the cache manifest")
        return cls(
            split=attrs["split"],
            num_samples=int(attrs["num_samples"]),
            latent_shape=tuple(int(s) for s in attrs["latent_shape"]),
            latent_dtype=attrs["latent_dtype"],
            vae=dict(attrs["vae"]),
            image=dict(attrs["image"]),
            skipped=dict(attrs["skipped"]),
            ignored=dict(attrs.get("ignored", {"count": 0, "keys": []})),
            source=attrs.get("source"),
            package_version=attrs["package_version"],
            complete=bool(attrs["complete"]),
            format=attrs["format"],
            format_version=int(attrs["format_version"]),
            chunk_size=int(attrs["chunk_size"]),
            num_inputs=int(attrs.get("num_inputs", 0)),
        )
