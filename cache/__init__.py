"""The Zarr stores: latent cache (manifest, writer, reader, loader, statistics, import), token store, and
where stores live (storage: local paths and URLs). Imports nothing from stages/.

Names are resolved on first use (PEP 562), so a light module such as `storage` is importable without
pulling in torch (the CLI's --help stays fast).
"""

from __future__ import annotations

import importlib

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"revq_pipe.cache.{_EXPORTS[name]}"), name)
