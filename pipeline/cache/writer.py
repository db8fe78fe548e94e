"""Writing a teacher cache shard by shard; `complete` is set last, then it is moved into place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout
from pipeline.cache.backends import format_for_path, open_backend
from pipeline.cache.codec import encode
from pipeline.errors import PipelineError
from pipeline.fsutil import check_writable, remove, replace


class CacheWriter:
    """Streams teacher logits into ``<out>.partial`` and renames it to ``out`` once complete.

    Rows arrive in order through `add`; whole shards are written as soon as they are full, so
    memory stays at one shard and no shard is ever written twice.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        sample_ids: np.ndarray,  # (N,)
        labels: np.ndarray,  # (N,)
        num_classes: int,
        num_views: int = 1,
        num_members: int = 0,
        dtype: str = "float32",
        compression: str = "zstd:3",
        chunk_rows: int = 0,
        chunks_per_shard: int = 16,
        fmt: str = "auto",
        overwrite: bool = False,
    ):
        self.out = Path(out)
        check_writable(self.out, overwrite)
        self.fmt = format_for_path(self.out, fmt)
        self.dtype = dtype
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.num_samples = len(self.sample_ids)
        self.num_members = num_members
        word = layout.stored_dtype(dtype)
        comp = layout.parse_compression(compression)
        if chunks_per_shard < 1:
            raise PipelineError(f"chunks_per_shard must be >= 1, got {chunks_per_shard}")
        rows = layout.chunk_rows_for(num_views * num_classes * word.itemsize, chunk_rows)
        self.chunk_rows = min(rows, max(1, self.num_samples))
        self.shard_rows = self.chunk_rows * chunks_per_shard

        self.partial = self.out.with_name(self.out.name + ".partial")
        remove(self.partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._backend = open_backend(self.partial, "w", self.fmt)
        n, v, c = self.num_samples, num_views, num_classes
        self._create(layout.LOGITS, (n, v, c), word, comp)
        if num_members:
            self._create(layout.MEMBER_LOGITS, (num_members, n, v, c), word, comp, axis=1)
        self._create(layout.SAMPLE_IDS, (n,), np.dtype(np.int64), comp)
        self._create(layout.LABELS, (n,), np.dtype(np.int64), comp)
        self._backend.write(layout.SAMPLE_IDS, 0, self.sample_ids)
        self._backend.write(layout.LABELS, 0, np.asarray(labels, dtype=np.int64))
        self._backend.set_attrs(
            {
                "format": layout.FORMAT,
                "format_version": layout.FORMAT_VERSION,
                "complete": False,
                "num_samples": n,
                "num_views": v,
                "num_classes": c,
                "logits_dtype": dtype,
                "compression": compression,
                "chunk_rows": self.chunk_rows,
                "shard_rows": self.shard_rows,
            }
        )
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0
        self._written = 0

    def _create(self, name, shape, dtype, comp, axis: int = 0) -> None:
        # Rows (axis 0, or 1 for members) are the only split: a chunk spans whole V and C and
        # one member; a shard spans all members, so a shard holds one row range completely.
        chunks, shards = list(shape), list(shape)
        chunks[axis], shards[axis] = self.chunk_rows, self.shard_rows
        chunks[:axis] = [1] * axis
        self._backend.create_array(name, shape, dtype, tuple(chunks), tuple(shards), comp)

    def add(self, logits: np.ndarray, members: np.ndarray | None = None) -> None:
        """Append the next rows: logits (B, V, C) float32, members (M, B, V, C) or None."""
        start = self._written + self._pending_rows
        bad = ~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)
        if bad.any():
            ids = self.sample_ids[start : start + len(logits)][bad][:5].tolist()
            raise PipelineError(f"teacher produced NaN/Inf logits for sample ids {ids}")
        self._pending.append((logits, members))
        self._pending_rows += len(logits)
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        logits = np.concatenate([p[0] for p in self._pending])
        members = None
        if self.num_members:
            members = np.concatenate([p[1] for p in self._pending], axis=1)
        start = self._written
        self._backend.write(layout.LOGITS, start, encode(logits[:rows], self.dtype))
        if members is not None:
            self._backend.write(
                layout.MEMBER_LOGITS, (0, start), encode(members[:, :rows], self.dtype)
            )
        self._written += rows
        rest = logits[rows:]
        self._pending = (
            [(rest, None if members is None else members[:, rows:])] if len(rest) else []
        )
        self._pending_rows = len(rest)

    def finish(self, attrs: dict[str, Any]) -> Path:
        """Write the last rows, the provenance attributes, then `complete`; move into place."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._written != self.num_samples:
            raise PipelineError(
                f"{self.out}: wrote {self._written} rows, expected {self.num_samples}"
            )
        self._backend.set_attrs(attrs)
        self._backend.set_attrs({"complete": True})
        self._backend.close()
        replace(self.partial, self.out)
        return self.out

    def abort(self) -> None:
        """Drop the partial output; the previous `out`, if any, is untouched."""
        self._backend.close()
        remove(self.partial)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
