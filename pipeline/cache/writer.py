"""Writing a teacher cache shard by shard, crash-safe and resumable; `complete` is set last.

Work in progress lives in ``<out>.partial``, always a Zarr group whatever the output format:
zarr writes each shard file whole (temporary name, then rename), and a shard is recorded in the
``progress`` attribute only after its arrays are on disk. A run killed at any point therefore
leaves a partial cache whose recorded shards are intact; the same run started again finds them
and writes only the rest, and because every shard is computed and encoded the same way either
way, the result is byte-identical to an uninterrupted run. A run with other settings is refused
rather than mixed. HDF5 output is converted from the finished partial into ``<out>.tmp`` and
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout
from pipeline.cache.backends import Backend, ZarrBackend, format_for_path, open_backend
from pipeline.cache.codec import encode
from pipeline.errors import PipelineError
from pipeline.fsutil import OutputLock, check_writable, remove, replace

# Test hook (tests/cache/test_resume.py): SIGKILL this process once shard K's logits are on
# disk but before its members and its record, the worst moment for a crash.
KILL_AT_SHARD_ENV = "KD_PIPELINE_TEST_KILL_AT_SHARD"


class CacheWriter:
    """Writes logits into ``<out>.partial`` shard by shard; `finish` moves the cache to `out`.

    `run` describes what produces the rows (params, teachers, data); with it, an existing
    partial cache of the same run is resumed (`shards_done` shards are already there) and one of
    another run is refused. Without it any partial cache is discarded.

    Rows are given either a shard at a time (`write_shard`, in shard order) or in any batches
    (`add`, which buffers up to a shard).
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
        compression: str = layout.DEFAULT_COMPRESSION,
        chunk_rows: int = 0,
        chunks_per_shard: int = 0,
        fmt: str = "auto",
        overwrite: bool = False,
        run: dict[str, Any] | None = None,
    ):
        self.out = Path(out)
        check_writable(self.out, overwrite)
        self.fmt = format_for_path(self.out, fmt)
        self.dtype = dtype
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.num_samples = n = len(self.sample_ids)
        self.num_members = num_members
        word = layout.stored_dtype(dtype)
        self._comp = layout.parse_compression(compression)
        rows = layout.chunk_rows_for(num_views * num_classes * word.itemsize, chunk_rows)
        per_shard = layout.chunks_per_shard_for(rows, chunks_per_shard)
        self.chunk_rows = min(rows, max(1, n))
        self.shard_rows = self.chunk_rows * per_shard
        self.num_shards = layout.num_shards(n, self.shard_rows)
        self.shapes = {
            layout.LOGITS: (n, num_views, num_classes),
            layout.SAMPLE_IDS: (n,),
            layout.LABELS: (n,),
        }
        if num_members:
            self.shapes[layout.MEMBER_LOGITS] = (num_members, n, num_views, num_classes)
        self.base_attrs = {
            "format": layout.FORMAT,
            "format_version": layout.FORMAT_VERSION,
            "complete": False,
            "num_samples": n,
            "num_views": num_views,
            "num_classes": num_classes,
            "num_members": num_members,
            "logits_dtype": dtype,
            "compression": compression,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
        }
        self.partial = self.out.with_name(self.out.name + ".partial")
        digests = {"sample_ids_sha256": _sha256(self.sample_ids), "labels_sha256": _sha256(labels)}
        described = {"output": self.fmt, "layout": self.base_attrs, "rows": digests, **(run or {})}
        # JSON-normalised, so it compares equal to the copy read back from the attributes.
        self.run = _plain(described)
        self.records: list[str] = []
        self._lock = OutputLock(self.out)
        self._lock.acquire()
        try:
            self._backend = self._resume() if run is not None else None
            if self._backend is None:
                self._backend = self._create(labels)
        except BaseException:
            self._lock.release()
            raise
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0
        kill_at = os.environ.get(KILL_AT_SHARD_ENV)
        self._kill_at = int(kill_at) if kill_at else None

    @property
    def shards_done(self) -> int:
        return len(self.records)

    @property
    def rows_done(self) -> int:
        return min(self.shards_done * self.shard_rows, self.num_samples)

    def shard(self, k: int) -> slice:
        """Rows [start, stop) of shard `k`."""
        return layout.shard_rows_range(k, self.num_samples, self.shard_rows)

    def _create(self, labels: np.ndarray) -> ZarrBackend:
        remove(self.partial)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        backend = open_backend(self.partial, "w", "zarr")
        for name, shape in self.shapes.items():
            word = layout.stored_dtype(self.dtype) if "logits" in name else np.dtype(np.int64)
            create_array(backend, name, shape, word, self._comp, self.chunk_rows, self.shard_rows)
        backend.write(layout.SAMPLE_IDS, 0, self.sample_ids)
        backend.write(layout.LABELS, 0, np.asarray(labels, dtype=np.int64))
        # The run is recorded before any shard is: a partial without it holds no finished work.
        backend.set_attrs({**self.base_attrs, layout.PROGRESS: self._progress()})
        return backend

    def _resume(self) -> ZarrBackend | None:
        """The partial cache of this same run, opened for writing; None if there is none."""
        if not self.partial.exists():
            return None
        try:
            backend = open_backend(self.partial, "r+", "zarr")
            progress = backend.attrs().get(layout.PROGRESS)
        except (PipelineError, OSError, ValueError):
            return None  # killed before its first record: nothing to keep
        if not isinstance(progress, dict) or "run" not in progress:
            return None
        if progress["run"] != self.run:
            raise PipelineError(
                f"{self.partial} holds an unfinished run with other settings "
                f"({_differences(progress['run'], self.run)}); re-run its command to resume it, "
                f"or delete {self.partial} to start over"
            )
        backend.discard_unfinished_writes()
        self.records = list(progress["shards_done"])
        return backend

    def _progress(self) -> dict[str, Any]:
        return {"run": self.run, "shards_done": self.records}

    def write_shard(
        self, k: int, logits: np.ndarray, members: np.ndarray | None = None, record: str = ""
    ) -> None:
        """Write shard `k` (the next unfinished one) and record it as done with `record`.

        logits (S, V, C) float32, members (M, S, V, C) or None; S = rows in the shard.
        """
        if k != self.shards_done:
            raise ValueError(f"shard {k} written out of order (next is {self.shards_done})")
        rows = self.shard(k)
        n = rows.stop - rows.start
        ids = self.sample_ids[rows]
        if logits.shape != (n, *self.shapes[layout.LOGITS][1:]):
            raise ValueError(f"shard {k}: logits {logits.shape}, expected {n} rows")
        if (members is not None) != bool(self.num_members):
            raise ValueError(f"members given: {members is not None}, writer has {self.num_members}")
        blocks = {layout.LOGITS: logits}
        if members is not None:
            blocks[layout.MEMBER_LOGITS] = members
        for name, values in blocks.items():
            if bad := nonfinite_ids(values, ids):
                raise PipelineError(f"NaN/Inf in {name} for sample ids {bad}")
            stored = encode(values, self.dtype)
            if self.dtype == "float16" and (bad := nonfinite_ids(stored, ids)):
                raise PipelineError(
                    f"{name} of sample ids {bad} overflow float16 (|x| > 65504); "
                    "use --dtype float32 or bfloat16"
                )
            self._backend.write(name, (0,) * layout.row_axis(name) + (rows.start,), stored)
            if k == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        self.records.append(record)
        self._backend.set_attrs({layout.PROGRESS: self._progress()})

    def add(self, logits: np.ndarray, members: np.ndarray | None = None) -> None:
        """Append the next rows: logits (B, V, C) float32, members (M, B, V, C) or None."""
        self._pending.append((logits, members))
        self._pending_rows += len(logits)
        while self.shards_done < self.num_shards:
            k = self.shards_done
            need = self.shard(k).stop - self.shard(k).start
            if self._pending_rows < need:
                break
            logits = np.concatenate([p[0] for p in self._pending])
            members = None
            if self.num_members:
                members = np.concatenate([p[1] for p in self._pending], axis=1)
            self.write_shard(k, logits[:need], None if members is None else members[:, :need])
            rest = (logits[need:], None if members is None else members[:, need:])
            self._pending = [rest] if len(rest[0]) else []
            self._pending_rows = len(rest[0])

    def finish(self, attrs: dict[str, Any]) -> Path:
        """Add the provenance `attrs`, then `complete`; move the cache into place at `out`."""
        if self.shards_done != self.num_shards or self._pending_rows:
            raise PipelineError(
                f"{self.out}: {self.rows_done + self._pending_rows} rows given, "
                f"expected {self.num_samples}"
            )
        final = {**self.base_attrs, **attrs, "complete": True}
        if self.fmt == "zarr":
            # One atomic write of zarr.json adds the provenance, drops the progress record and
            # sets `complete`, after every shard is on disk.
            self._backend.replace_attrs(final)
            self._backend.close()
            replace(self.partial, self.out)
        else:
            # The partial keeps its progress record: a crash while converting redoes only this.
            self._backend.set_attrs({k: v for k, v in final.items() if k != "complete"})
            tmp = self.out.with_name(self.out.name + ".tmp")
            remove(tmp)
            try:
                copy_cache(self._backend, tmp, "hdf5")
            except BaseException:
                remove(tmp)
                raise
            self._backend.close()
            replace(tmp, self.out)
            remove(self.partial)
        self._lock.release()
        return self.out

    def abort(self) -> None:
        """Stop after a failure: keep finished shards for a re-run, or drop an empty partial.

        The previous `out`, if any, is untouched either way.
        """
        self._backend.close()
        if not self.shards_done:
            remove(self.partial)
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def create_array(
    backend: Backend,
    name: str,
    shape: tuple[int, ...],
    word: np.dtype,
    compression: tuple[str, int],
    chunk_rows: int,
    shard_rows: int,
) -> None:
    """Create layout array `name`, chunked and sharded along its N axis."""
    chunks, shards = layout.chunking(name, shape, chunk_rows, shard_rows)
    backend.create_array(name, shape, word, chunks, shards, compression)


def copy_cache(src: Backend, dst: str | Path, fmt: str) -> Path:
    """Copy every array (stored words, unchanged) and attribute of the finished cache `src`
    into a new cache at `dst` in `fmt`, block by block; `complete` is set last."""
    attrs = src.attrs()
    attrs.pop(layout.PROGRESS, None)
    attrs.pop("complete", None)
    comp = layout.parse_compression(attrs["compression"])
    chunk_rows, shard_rows = int(attrs["chunk_rows"]), int(attrs["shard_rows"])
    out = open_backend(dst, "w", fmt)
    try:
        for name in layout.ARRAYS:
            if not src.has(name):
                continue
            shape, axis = src.shape(name), layout.row_axis(name)
            create_array(out, name, shape, src.dtype(name), comp, chunk_rows, shard_rows)
            for rows in layout.shard_ranges(shape[axis], shard_rows):
                block = src.read(name, layout.block_index(name, rows))
                out.write(name, (0,) * axis + (rows.start,), block)
        out.set_attrs({**attrs, "complete": False})
        out.set_attrs({"complete": True})
    finally:
        out.close()
    return Path(dst)


def nonfinite_ids(values: np.ndarray, ids: np.ndarray) -> list[int]:
    """The first (up to 5) of `ids` (S,) whose rows of `values` (..., S, V, C) hold NaN/Inf."""
    finite = np.isfinite(values)
    if finite.all():
        return []
    rows_axis = values.ndim - 3
    bad = ~finite.all(axis=tuple(a for a in range(values.ndim) if a != rows_axis))
    return ids[bad][:5].tolist()


class Background:
    """Runs jobs in order on one worker thread, so teacher compute overlaps cache writes.

    At most `depth` jobs wait, so memory stays bounded. A failed job stops the later ones and
    its exception is raised in the caller at the next `submit` or at `join`.
    """

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="cache-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as e:  # handed to the caller, which decides
                    self._error = e

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def join(self) -> None:
        """Wait for every submitted job; raise the first failure."""
        self._jobs.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<i8").tobytes()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first few keys where two nested dicts differ, as 'a.b: old → new'."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in {**a, **b} if a.get(k) != b.get(k)]
    shown = [f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in keys[:3]]
    return "; ".join(shown) + ("; ..." if len(keys) > 3 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "..."


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): d}
