"""The teacher-target store: the node table (`schema`), sizing rules (`layout`), Zarr and HDF5
backends, writer, reader and verify."""

from pipeline.cache.reader import TeacherCache, describe, open_cache
from pipeline.cache.writer import CacheWriter

__all__ = ["CacheWriter", "TeacherCache", "describe", "open_cache"]
