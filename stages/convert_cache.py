"""Stage: convert a cache between Zarr and HDF5, losslessly (stored words and attributes)."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import open_cache
from pipeline.cache.backends import format_for_path
from pipeline.cache.layout import compression_for, parse_compression
from pipeline.cache.writer import copy_cache
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output, check_not_input


def run(
    src: Path, dst: Path, fmt: str = "auto", overwrite: bool = False, compression: str = "auto"
) -> Path:
    """Copy the complete cache at `src` to `dst` in `fmt` (auto: by `dst`'s suffix),
    compressed with `compression` (auto: the format's default, so an HDF5 copy opens in plain
    h5py; "keep": the source's).

    The copy is written beside `dst` and moved into place only once complete.
    """
    src, dst = Path(src), Path(dst)
    fmt = format_for_path(dst, fmt)
    if dst.resolve() == src.resolve():
        raise PipelineError(f"convert-cache: SRC and DST are the same path ({src})")
    check_not_input(dst, {"SRC": src}, "DST")
    if compression != "keep":
        parse_compression(compression_for(compression, fmt))
    with open_cache(src) as cache:
        cache.require_complete()
        with atomic_output(dst, overwrite) as tmp:
            copy_cache(
                cache.backend, tmp, fmt, compression=None if compression == "keep" else compression
            )
    return dst
