"""Opening a teacher cache for reading: checks, the sample-id join, decoded logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout
from pipeline.cache.backends import open_backend
from pipeline.cache.codec import decode
from pipeline.errors import PipelineError


class TeacherCache:
    """A cache opened read-only. Arrays are read in whole ranges, never row by row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._backend = open_backend(self.path, "r")
        self.format = self._backend.name
        self.attrs: dict[str, Any] = self._backend.attrs()
        if self.attrs.get("format") != layout.FORMAT:
            self.close()
            raise PipelineError(f"{self.path}: not a kd-pipeline teacher cache")
        version = self.attrs.get("format_version")
        if version != layout.FORMAT_VERSION:
            self.close()
            raise PipelineError(
                f"{self.path}: cache format_version {version}, this tool reads "
                f"{layout.FORMAT_VERSION}"
            )

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def num_views(self) -> int:
        return int(self.attrs["num_views"])

    @property
    def dtype(self) -> str:
        return str(self.attrs["logits_dtype"])

    @property
    def fingerprint(self) -> str | None:
        return (self.attrs.get("data") or {}).get("fingerprint")

    @property
    def has_members(self) -> bool:
        return self._backend.has(layout.MEMBER_LOGITS)

    @property
    def sample_ids(self) -> np.ndarray:  # (N,)
        return self._backend.read(layout.SAMPLE_IDS)

    @property
    def labels(self) -> np.ndarray:  # (N,)
        return self._backend.read(layout.LABELS)

    def read_stored(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Raw stored words of array `name` (bfloat16 stays uint16)."""
        return self._backend.read(name, rows)

    def logits(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Combined teacher logits as float32.  # (n, V, C)"""
        return decode(self._backend.read(layout.LOGITS, rows), self.dtype)

    def member_logits(self) -> np.ndarray:
        """Per-member logits as float32.  # (M, N, V, C)"""
        if not self.has_members:
            raise PipelineError(f"{self.path}: cache has no members/logits (--keep-members)")
        return decode(self._backend.read(layout.MEMBER_LOGITS), self.dtype)

    def require_complete(self) -> None:
        if not self.complete:
            raise PipelineError(
                f"{self.path}: cache is incomplete (its precompute run did not finish); "
                "re-run precompute-logits"
            )

    def require_fingerprint(self, fingerprint: str, spec: str) -> None:
        if fingerprint != self.fingerprint:
            built = (self.attrs.get("data") or {}).get("spec", "?")
            raise PipelineError(
                f"{self.path}: cache was built from other data ({built}, fingerprint "
                f"{str(self.fingerprint)[:12]}) than --data {spec} (fingerprint {fingerprint[:12]})"
            )

    def rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Row index in the cache of each sample id; a missing id is an error naming it.  # (n,)"""
        cache_ids = self.sample_ids
        order = np.argsort(cache_ids, kind="stable")
        pos = np.searchsorted(cache_ids, ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos] if len(order) else pos
        missing = (cache_ids[rows] != ids) if len(order) else np.ones(len(ids), bool)
        if missing.any():
            first = np.asarray(ids)[missing][:5].tolist()
            raise PipelineError(f"{self.path}: sample ids not in the cache: {first}")
        return rows

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | Path) -> TeacherCache:
    """Open a cache (Zarr directory or HDF5 file), detecting the format."""
    return TeacherCache(path)


def describe(cache: TeacherCache) -> dict[str, Any]:
    """Everything `pipeline inspect` shows about a cache."""
    arrays = {}
    for name in (layout.LOGITS, layout.MEMBER_LOGITS, layout.SAMPLE_IDS, layout.LABELS):
        if cache._backend.has(name):
            arrays[name] = {
                "shape": list(cache._backend.shape(name)),
                "stored_dtype": str(cache._backend.dtype(name)),
            }
    return {
        "path": str(cache.path),
        "format": cache.format,
        "size_bytes": _size_on_disk(cache.path),
        "arrays": arrays,
        **cache.attrs,
    }


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
