"""The Zarr latent cache: manifest, writer, reader, statistics and import. Imports nothing from stages/."""

from revq_pipe.cache.importer import import_tensor
from revq_pipe.cache.reader import LatentCache, cache_info
from revq_pipe.cache.schema import FORMAT, FORMAT_VERSION, CacheError, CacheManifest
from revq_pipe.cache.stats import MomentAccumulator
from revq_pipe.cache.writer import CacheWriter

__all__ = ["CacheError", "CacheManifest", "CacheWriter", "FORMAT", "FORMAT_VERSION", "LatentCache",
           "MomentAccumulator", "cache_info", "import_tensor"]
