"""The cache: the contract between stage one and stage two.

The node table (`schema`), sizing rules (`layout`), the encoding of stored values (`codec`,
`sparse` for top-k and sampled targets, `features` for feature targets), Zarr and HDF5
`backends` behind one interface, `store` (local paths and fsspec URLs), `writer`, `reader`,
`ensemble` (combining members) and `verify`.

May import: pipeline.core, pipeline.data (views). Never a stage's package: both stages import
it, so it stays the one definition of what a cache holds.
"""

from pipeline.cache.reader import TeacherCache, describe, open_cache
from pipeline.cache.writer import CacheWriter

__all__ = ["CacheWriter", "TeacherCache", "describe", "open_cache"]
