"""Sizing rules shared by both backends: stored dtypes, compression, chunks, shards.

What a cache holds (its nodes) is the table in `schema.py`; how those nodes are cut into chunks
and shards lives here, so the Zarr and HDF5 backends stay thin: they only move named arrays and
a JSON attribute dict.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError

FORMAT = "kd-target-cache"
# Version 2 adds a checksum to every stored chunk (Zarr: crc32c after the compressor; HDF5: the
# fletcher32 filter) and the `shard_digests` attribute. Version 1 caches (no checksums) are
# still read, unchanged.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Attribute set at finish: the sha256 of every shard of every node as stored (see
# `Backend.shard_digests`), so `pipeline verify` can prove a cache is the one that was written.
DIGESTS = "shard_digests"

# Attribute set at finish, beside the shard digests: the sha256 of every other attribute but
# `complete` (canonical JSON), so that an edited attribute (a dtype, the views' spec, a
# feature's parameters, a digest) is refused by every reader, not believed. Caches finished
# before it was added have none (verify says so).
ATTRS_DIGEST = "attrs_digest"

# Attribute of an unfinished cache only: the run it belongs to and one record per finished
# shard. `finish` drops it in the same write that sets `complete`.
PROGRESS = "progress"

# Defaults chosen from benchmarks/bench_precompute.py (figures in the README). Reading a whole
# array runs at ~35 MB/s with 10 KiB chunks, ~500 MB/s at 160 KiB and ~1 GB/s from 2 MiB up
# (zarr pays a fixed cost per chunk), while the compressed size does not depend on the chunk
# size: so chunks of about 2 MiB. A shard is one file and the unit a crashed run resumes from:
# at most 16 chunks (a cache stays a handful of files for DVC) and at most 16384 rows (a crash
# loses at most that much teacher work, even when rows are tiny as with 10 classes).
CHUNK_TARGET_BYTES = 2 << 20
SHARD_TARGET_ROWS = 16384
MAX_CHUNKS_PER_SHARD = 16

# Logical dtype → (numpy dtype stored on disk). bfloat16 has no numpy/zarr/HDF5 type, so its
# raw 16-bit words are stored as uint16 and the `logits_dtype` attribute says how to read them.
STORED_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def stored_dtype(dtype: str, where: str = "--dtype") -> np.dtype:
    if dtype not in STORED_DTYPES:
        raise PipelineError(f"{where} {dtype!r}: expected one of {', '.join(STORED_DTYPES)}")
    return np.dtype(STORED_DTYPES[dtype])


# gzip (deflate) is in every HDF5 build, so an HDF5 cache opens in plain h5py, HDFView,
# MATLAB or Julia; zstd needs hdf5plugin there. Zarr readers all have zstd.
DEFAULT_COMPRESSION_FOR = {"zarr": "zstd:3", "hdf5": "gzip:4"}
LEVELS = {"zstd": (1, 22, 3), "gzip": (1, 9, 4)}  # codec: (lowest, highest, default level)


def compression_for(spec: str, fmt: str) -> str:
    """The compression spec a cache of format `fmt` gets: `spec`, or for "auto" the
    format's default."""
    return DEFAULT_COMPRESSION_FOR[fmt] if spec == "auto" else spec


def parse_compression(spec: str, where: str = "--compression") -> tuple[str, int]:
    """'zstd:LEVEL' | 'gzip:LEVEL' | 'zstd' | 'gzip' | 'none' → (codec, level)."""
    codec, _, level = spec.partition(":")
    if codec == "none" and not level:
        return "none", 0
    if codec in LEVELS:
        low, high, default = LEVELS[codec]
        try:
            lvl = int(level) if level else default
        except ValueError:
            lvl = None
        if lvl is not None and low <= lvl <= high:
            return codec, lvl
    raise PipelineError(
        f"{where} {spec!r}: expected auto, zstd:LEVEL (1-22), gzip:LEVEL (1-9) or none"
    )


def chunk_rows_for(row_bytes: int, requested: int = 0) -> int:
    """Rows per chunk: `requested` if set, else the power of two nearest below
    CHUNK_TARGET_BYTES / `row_bytes`, at most SHARD_TARGET_ROWS. Powers of two put shard
    edges on batch edges, so no forward call has to be split at a shard boundary."""
    if requested < 0:
        raise PipelineError(f"--chunk-rows must be >= 0, got {requested}")
    if requested:
        return requested
    rows = max(1, min(SHARD_TARGET_ROWS, CHUNK_TARGET_BYTES // max(1, row_bytes)))
    return 1 << (rows.bit_length() - 1)


def chunks_per_shard_for(chunk_rows: int, requested: int = 0) -> int:
    """Chunks per shard: `requested` if set, else as many as fit SHARD_TARGET_ROWS rows, at
    least 1 and at most MAX_CHUNKS_PER_SHARD."""
    if requested < 0:
        raise PipelineError(f"--chunks-per-shard must be >= 0, got {requested}")
    return requested or max(1, min(MAX_CHUNKS_PER_SHARD, SHARD_TARGET_ROWS // chunk_rows))


def chunking(
    shape: tuple[int, ...], axis: int, chunk_rows: int, shard_rows: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, shards) of an array whose rows (N) lie along `axis`: a chunk spans one index of
    every axis before N (one member) and the whole of every axis after it (V, C); a shard spans
    every member, so one shard holds one row range of the array completely."""
    chunks, shards = list(shape), list(shape)
    chunks[:axis] = [1] * axis
    chunks[axis], shards[axis] = chunk_rows, shard_rows
    return tuple(chunks), tuple(shards)


def num_shards(num_samples: int, shard_rows: int) -> int:
    return math.ceil(num_samples / shard_rows)


def shard_rows_range(shard: int, num_samples: int, shard_rows: int) -> slice:
    """Rows [start, stop) of shard number `shard`."""
    start = shard * shard_rows
    return slice(start, min(start + shard_rows, num_samples))


def shard_ranges(num_samples: int, shard_rows: int) -> list[slice]:
    """Rows [start, stop) of every shard, in order."""
    return [
        shard_rows_range(k, num_samples, shard_rows)
        for k in range(num_shards(num_samples, shard_rows))
    ]


def block_index(axis: int, rows: slice) -> tuple[slice, ...]:
    """Index selecting `rows` along the N axis `axis` (and everything else)."""
    return (slice(None),) * axis + (rows,)


# Byte sizes as users write them: --max-cache-size 20GiB (and the same rule as --cache-memory).
SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
    "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4,
    "tib": 1 << 40,
}  # fmt: skip


def parse_size(value: int | str, option: str) -> int:
    """Bytes in `value`: an int, or a number with a unit (512MiB, 20GiB, 1.5GB, 100k)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in SIZE_UNITS:
            raise PipelineError(f"{option} {value!r}: expected a size such as 512MiB or 20GiB")
        size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise PipelineError(f"{option} {value!r}: must be > 0")
    return size


def format_size(num_bytes: int) -> str:
    """e.g. 1536 -> "1.5 KiB"."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def attrs_digest(attrs: Mapping[str, Any]) -> dict[str, str]:
    """The `ATTRS_DIGEST` attribute of a cache with attributes `attrs`: sha256 of the canonical
    JSON of all of them but itself, `complete` and the progress record."""
    kept = {k: v for k, v in attrs.items() if k not in (ATTRS_DIGEST, "complete", PROGRESS)}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {"algorithm": "sha256", "value": hashlib.sha256(text.encode()).hexdigest()}


def cache_identity(attrs: Mapping[str, Any]) -> str:
    """What tells one finished cache from any other: its attribute digest (which covers the
    shard digests, so every stored byte), computed for a cache written before it was recorded."""
    recorded = attrs.get(ATTRS_DIGEST)
    if isinstance(recorded, Mapping) and isinstance(recorded.get("value"), str):
        return recorded["value"]
    return attrs_digest(attrs)["value"]


def check_attrs(path: Any, attrs: Mapping[str, Any], checksummed: bool) -> None:
    """Refuse attributes that are not the ones written: a digest that does not match, or a
    version-1 cache that carries version-2 markers (checksummed chunks, digests), which is a
    version-2 cache whose version was edited to switch its checks off."""
    version = attrs.get("format_version")
    if version == 1 and (checksummed or DIGESTS in attrs or ATTRS_DIGEST in attrs):
        raise PipelineError(
            f"cache {path} is damaged: its format_version says 1 (no checksums), but it "
            "carries version-2 checksums and digests: the version was edited"
        )
    recorded = attrs.get(ATTRS_DIGEST)
    if recorded is None:
        return
    if not isinstance(recorded, Mapping) or recorded.get("value") != attrs_digest(attrs)["value"]:
        raise PipelineError(
            f"cache {path} is damaged: its attributes differ from the digest recorded when it "
            f"was written ({ATTRS_DIGEST}): an attribute was edited"
        )
