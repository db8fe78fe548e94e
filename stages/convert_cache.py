"""Stage: convert a cache between Zarr and HDF5, losslessly (stored words and attributes)."""

from __future__ import annotations

import secrets
from pathlib import Path

from pipeline.cache import open_cache
from pipeline.cache.backends import format_for_path
from pipeline.cache.copy import copy_cache
from pipeline.cache.layout import compression_for, parse_compression
from pipeline.cache.store import check_output, location, publish, remove_url, sibling
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_output, check_not_input


def run(
    src: Path | str,
    dst: Path | str,
    fmt: str = "auto",
    overwrite: bool = False,
    compression: str = "auto",
) -> Path | str:
    """Copy the complete cache at `src` to `dst` in `fmt` (auto: by `dst`'s suffix),
    compressed with `compression` (auto: the format's default, so an HDF5 copy opens in plain
    h5py; "keep": the source's).

    The copy is written beside `dst` and moved into place only once complete. Either may be
    a URL (object storage, Zarr only).
    """
    src, dst = location(src), location(dst)
    fmt = format_for_path(dst, fmt)
    if str(dst) == str(src) or (
        isinstance(src, Path) and isinstance(dst, Path) and dst.resolve() == src.resolve()
    ):
        raise PipelineError(f"convert-cache: SRC and DST are the same path ({src})")
    if isinstance(src, Path) and isinstance(dst, Path):
        check_not_input(dst, {"SRC": src}, "DST")
    if compression != "keep":
        parse_compression(compression_for(compression, fmt))
    recompress = None if compression == "keep" else compression
    with open_cache(src) as cache:
        cache.require_complete()
        if isinstance(dst, str):  # object storage: no rename, published once complete
            check_output(dst, overwrite)
            tmp = sibling(dst, f".tmp-{secrets.token_hex(4)}")
            try:
                copy_cache(cache.backend, tmp, fmt, compression=recompress)
                publish(tmp, dst)
            finally:
                remove_url(tmp)
            return dst
        with atomic_output(dst, overwrite) as tmp:
            copy_cache(cache.backend, tmp, fmt, compression=recompress)
    return dst
