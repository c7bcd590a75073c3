"""The Zarr latent cache: manifest, writer, reader, statistics and import. Imports nothing from stages/."""

from cache.importer import import_tensor
from cache.reader import LatentCache, cache_info
from cache.schema import FORMAT, FORMAT_VERSION, CacheError, CacheManifest
from cache.stats import MomentAccumulator
from cache.writer import CacheWriter

__all__ = ["CacheError", "CacheManifest", "CacheWriter", "FORMAT", "FORMAT_VERSION", "LatentCache",
           "MomentAccumulator", "cache_info", "import_tensor"]
