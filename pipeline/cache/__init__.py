"""The teacher-target store: one logical layout (`layout`), Zarr and HDF5 backends."""

from pipeline.cache.reader import TeacherCache, describe, open_cache
from pipeline.cache.writer import CacheWriter

__all__ = ["CacheWriter", "TeacherCache", "describe", "open_cache"]
