"""The logical cache layout shared by both backends (see the design's table).

Array names, attribute names, stored dtypes and chunk sizing live here, so the Zarr and HDF5
backends stay thin: they only move named arrays and a JSON attribute dict.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError

FORMAT = "kd-target-cache"
FORMAT_VERSION = 1

LOGITS = "logits"  # (N, V, C) raw teacher logits, T = 1
MEMBER_LOGITS = "members/logits"  # (M, N, V, C)
SAMPLE_IDS = "sample_ids"  # (N,) int64
LABELS = "labels"  # (N,) int64, -1 unknown
VIEW_SEEDS = "views/seed"  # (N, V) int64

CHUNK_TARGET_BYTES = 2 << 20

# Logical dtype → (numpy dtype stored on disk). bfloat16 has no numpy/zarr/HDF5 type, so its
# raw 16-bit words are stored as uint16 and the `logits_dtype` attribute says how to read them.
STORED_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def stored_dtype(dtype: str) -> np.dtype:
    if dtype not in STORED_DTYPES:
        raise PipelineError(f"--dtype {dtype!r}: expected one of {', '.join(STORED_DTYPES)}")
    return np.dtype(STORED_DTYPES[dtype])


def parse_compression(spec: str) -> tuple[str, int]:
    """'zstd:LEVEL' | 'zstd' | 'none' → (codec, level)."""
    codec, _, level = spec.partition(":")
    if codec == "none" and not level:
        return "none", 0
    if codec == "zstd":
        try:
            lvl = int(level) if level else 3
        except ValueError:
            lvl = None
        if lvl is not None and 1 <= lvl <= 22:
            return "zstd", lvl
    raise PipelineError(f"--compression {spec!r}: expected zstd:LEVEL (1-22) or none")


def chunk_rows_for(row_bytes: int, requested: int = 0) -> int:
    """Rows per chunk: `requested` if set, else enough rows for about 2 MiB."""
    if requested < 0:
        raise PipelineError(f"chunk_rows must be >= 0, got {requested}")
    return requested or max(1, CHUNK_TARGET_BYTES // max(1, row_bytes))
