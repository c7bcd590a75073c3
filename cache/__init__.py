"""The Zarr stores: latent cache (manifest, writer, reader, loader, statistics, import), token store, and
where stores live (storage: local paths and URLs). Imports nothing from stages/.

Names are resolved on first use (PEP 562), so a light module such as `storage` is importable without
pulling in torch (the CLI's --help stays fast).
"""

from __future__ import annotations

from revq_pipe.pipeline.lazy import lazy_attributes

_EXPORTS = {
    "CacheError": "schema",
    "CacheManifest": "schema",
    "FORMAT": "schema",
    "FORMAT_VERSION": "schema",
    "CacheWriter": "writer",
    "LatentCache": "reader",
    "cache_info": "reader",
    "MomentAccumulator": "stats",
    "import_tensor": "importer",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes("revq_pipe.cache", _EXPORTS)
