"""Writing a teacher cache shard by shard, crash-safe and resumable; `complete` is set last.

Work in progress lives in ``<out>.partial``, always a Zarr group whatever the output format:
zarr writes each shard file whole (temporary name, then rename), and a shard is recorded as done
(a small record file of its own, ``progress/shard-K.json``, written whole) only after its arrays
are on disk. A run killed at any point therefore leaves a partial cache whose recorded shards
are intact; the same run started again finds them and writes only the rest, and because every
shard is computed and encoded the same way either way, the result is byte-identical to an
uninterrupted run. A run with other settings (recorded in the ``progress`` attribute when the
partial is created) is refused rather than mixed. HDF5 output is converted from the finished
partial into a temporary name unique to the run (``<out>.tmp-<random>``) and renamed into place.
Every move into place is journaled in the output's lock (`pipeline.core.lock`): a kill while
publishing is undone or finished by the next run, which publishes a whole cache of its own
run (matched by `run_digest`) rather than computing it again.

Shards may be written in any order and by several processes at once (`join`): under torchrun
rank 0 creates or resumes the partial cache, the other ranks join it, each writes whole shards
of its own with their records, and rank 0 finishes once every shard is recorded.

The writer deletes only what it created: a ``<out>.partial`` that is not an unfinished cache of
this tool (a Zarr group carrying our ``progress`` record) is refused, never removed.

At finish the sha256 of every shard of every node, as stored, goes into the attributes
(`layout.DIGESTS`), so `pipeline verify` can prove the cache is the one that was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import copy as cachecopy
from pipeline.cache import layout, schema, store
from pipeline.cache.backends import format_for_path, open_backend
from pipeline.cache.schema import LABELS, SAMPLE_IDS
from pipeline.cache.zarr_backend import ZarrBackend
from pipeline.core import fsutil
from pipeline.core.errors import PipelineError

# Test hook (tests/cache/test_resume.py): SIGKILL this process once shard K's logits are on
# disk but before its members and its record, the worst moment for a crash.
KILL_AT_SHARD_ENV = "KD_PIPELINE_TEST_KILL_AT_SHARD"

Values = Mapping[str, np.ndarray]  # node name -> decoded values


class CacheWriter:
    """Writes a cache into ``<out>.partial`` shard by shard; `finish` moves it to `out`.

    The nodes written are those of the table (`schema`) a cache of these sizes holds: the
    required ones, members/logits when `num_members` > 0, and the optional ones named in
    `nodes` (their extra dimensions sized by `dims`); then the family nodes `attrs` declares
    (e.g. {"features": {...}}: features/<name>), `attrs` being stored with the layout, so a
    partial cache declaring others is refused, not resumed. "create" nodes are given whole here
    (`sample_ids`, `labels`, others in `values`); "shard" nodes a shard at a time
    (`write_shard`, in any order) or in any batches (`add`, which buffers up to a shard and
    writes the unfinished shards in order).

    `run` describes what produces the rows (params, teachers, data); with it, an existing
    partial cache of the same run is resumed (the shards in `records` are already there) and one
    of another run is refused. Without it any partial cache is discarded. `join`: another
    process (rank 0) has opened the partial cache of this same run; write shards into it,
    without the output's lock, and leave `finish` to that process.
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
        nodes: Iterable[str] = (),
        dims: Mapping[str, int] | None = None,
        attrs: Mapping[str, Any] | None = None,
        values: Values | None = None,
        dtype: str = "float32",
        compression: str = "auto",
        chunk_rows: int = 0,
        chunks_per_shard: int = 0,
        fmt: str = "auto",
        overwrite: bool = False,
        run: dict[str, Any] | None = None,
        format_version: int = layout.FORMAT_VERSION,
        join: bool = False,
    ):
        self.out = store.location(out)  # a local Path, or a URL (object storage, Zarr only)
        self.fmt = format_for_path(self.out, fmt)
        store.check_output(self.out, overwrite)
        self.overwrite = overwrite  # checked again right before the finished cache moves in
        self._complete = False
        self.dtype = dtype
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.num_samples = n = len(self.sample_ids)
        self.num_members = num_members
        base = {"N": n, "V": num_views, "C": num_classes, "M": num_members}
        asked, self.declares = tuple(nodes), dict(attrs or {})
        self.nodes, self.dims = schema.plan_nodes(base, asked, dict(dims or {}), self.declares)
        self._by_name = {node.name: node for node in self.nodes}
        self.sizes = {**base, **self.dims}
        self.shapes = {node.name: node.shape(self.sizes) for node in self.nodes}
        compression = layout.compression_for(compression, self.fmt)
        self._comp = layout.parse_compression(compression)
        self._checksums = _checksums(format_version)
        self._size_storage(self._row_bytes(), chunk_rows, chunks_per_shard)
        # Refused before anything is written: bad labels, repeated ids.
        self._whole = self._check_whole({SAMPLE_IDS: sample_ids, LABELS: labels, **(values or {})})
        self.base_attrs = self._layout_attrs(compression, asked, format_version)
        self.partial = store.sibling(self.out, ".partial")
        self.run = self._run_record(run)
        self.joined = join
        self.finished = False  # set when a killed run's whole cache was published instead
        # Shard -> the caller's record of it, for every finished shard; with the sha256 of each
        # of its shard files, taken as it was written, so `finish` hashes only what is missing.
        self.records: dict[int, str] = {}
        self._digests: dict[str, dict[int, str | None]] = {}
        self._open(resume=run is not None)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        kill_at = os.environ.get(KILL_AT_SHARD_ENV)
        self._kill_at = int(kill_at) if kill_at else None

    def _row_bytes(self) -> int:
        """Bytes of one row of logits, or of the widest declared node (a feature) where wider:
        chunks of hints stay about `layout.CHUNK_TARGET_BYTES`, as chunks of logits do."""
        wide = {schema.LOGITS} | {n.name for n in schema.declared(self.declares)}
        return max(
            schema.row_bytes(n, self.sizes, self.dtype) for n in self.nodes if n.name in wide
        )

    def _size_storage(self, row_bytes: int, chunk_rows: int, chunks_per_shard: int) -> None:
        """Rows per chunk and per shard, sized on `row_bytes` (`layout`'s rules)."""
        rows = layout.chunk_rows_for(row_bytes, chunk_rows)
        per_shard = layout.chunks_per_shard_for(rows, chunks_per_shard)
        self.chunk_rows = min(rows, max(1, self.num_samples))
        self.shard_rows = self.chunk_rows * per_shard
        self.num_shards = layout.num_shards(self.num_samples, self.shard_rows)

    def _check_whole(self, given: Values) -> dict[str, np.ndarray]:
        """The stored words of every "create" node, after their checks."""
        create = [node for node in self.nodes if node.written == "create"]
        expected = {node.name for node in create}
        if set(given) != expected:
            raise ValueError(f"whole arrays given for {sorted(given)}, expected {sorted(expected)}")
        whole = {}
        for node in create:
            values = node.checked_values(given[node.name])
            if values.shape != self.shapes[node.name]:
                raise ValueError(f"{node.name} {values.shape}, expected {self.shapes[node.name]}")
            self._refuse_problems(node, values, self.sample_ids)
            whole[node.name] = node.encode(values, self.dtype)
        return whole

    def _refuse_problems(self, node: schema.Node, values: np.ndarray, ids: np.ndarray) -> None:
        if problems := node.problems(values, ids, self.sizes, self.dtype):
            raise PipelineError(f"{self.out}: {node.name}: {'; '.join(problems)}")

    def _layout_attrs(
        self, compression: str, asked: tuple[str, ...], format_version: int
    ) -> dict[str, Any]:
        """The attributes fixed by the layout; `dims` and `nodes` only when extra nodes exist,
        so a cache without them has exactly the attributes of earlier versions."""
        attrs = {
            "format": layout.FORMAT,
            "format_version": format_version,
            "complete": False,
            "num_samples": self.num_samples,
            "num_views": self.sizes["V"],
            "num_classes": self.sizes["C"],
            "num_members": self.num_members,
            "logits_dtype": self.dtype,
            "compression": compression,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            **self.declares,
        }
        if self.dims:
            attrs["dims"] = self.dims
        if asked:
            attrs["nodes"] = [node.name for node in self.nodes if node.name in asked]
        return attrs

    def _run_record(self, run: dict[str, Any] | None) -> dict[str, Any]:
        """What a partial cache must match to be resumed: layout, rows, and the caller's `run`."""
        digests = {f"{name}_sha256": _sha256(words) for name, words in self._whole.items()}
        described = {"output": self.fmt, "layout": self.base_attrs, "rows": digests, **(run or {})}
        # JSON-normalised, so it compares equal to the copy read back from the attributes.
        return _plain(described)

    def _open(self, resume: bool) -> None:
        """Take the output's lock, then resume this run's partial cache or start a new one;
        joining, open the partial cache the process holding the lock opened."""
        # Object stores have no locks: one writer per URL is up to the user.
        self._lock = fsutil.OutputLock(self.out) if isinstance(self.out, Path) else _NoLock()
        if self.joined:
            self._backend = self._join()
            return
        self._lock.acquire()
        try:
            self.finished = self._finish_interrupted()
            if self.finished:
                self._lock.release()
                return
            self._backend = self._resume() if resume else None
            if self._backend is None:
                self._backend = self._create()
        except BaseException:
            self._lock.release()
            raise

    @property
    def shards_done(self) -> int:
        return len(self.records)

    @property
    def rows_done(self) -> int:
        return sum(self.shard(k).stop - self.shard(k).start for k in self.records)

    @property
    def shards_left(self) -> list[int]:
        """The shards not written yet, in order."""
        return [k for k in range(self.num_shards) if k not in self.records]

    @property
    def shard_nodes(self) -> list[str]:
        """Names of the nodes given shard by shard, in table order."""
        return [node.name for node in self.nodes if node.written == "shard"]

    def shard(self, k: int) -> slice:
        """Rows [start, stop) of shard `k`."""
        return layout.shard_rows_range(k, self.num_samples, self.shard_rows)

    def _create(self) -> ZarrBackend:
        if store.exists(self.partial):
            if not _ours(self.partial):
                raise PipelineError(
                    f"{self.partial} exists and is not an unfinished cache of kd-pipeline; "
                    "move or delete it (it is not deleted for you)"
                )
            _remove(self.partial)
        if isinstance(self.partial, Path):
            self.partial.parent.mkdir(parents=True, exist_ok=True)
        # The run is recorded in the group's first zarr.json, before any array: a partial is
        # recognisably ours from the moment it exists, and one without finished shards holds
        # no work (a rerun starts it over).
        attrs = {**self.base_attrs, **self._progress_attr()}
        backend = store.guarded(str(self.partial), lambda: ZarrBackend(self.partial, "w", attrs))
        for node in self.nodes:
            word = node.stored_dtype(self.dtype)
            shape = self.shapes[node.name]
            cachecopy.create_array(
                backend, node, shape, word, self._comp, self.chunk_rows, self.shard_rows,
                checksum=self._checksums,
            )  # fmt: skip
        for name, words in self._whole.items():
            backend.write(name, 0, words)
        return backend

    def _resume(self) -> ZarrBackend | None:
        """The partial cache of this same run, opened for writing; None if there is none."""
        if not store.exists(self.partial):
            return None
        try:
            backend = open_backend(self.partial, "r+", "zarr")
            progress = backend.attrs().get(layout.PROGRESS)
        except (PipelineError, OSError, ValueError):
            return None  # unreadable: `_create` starts over only if it is ours
        if not isinstance(progress, dict) or "run" not in progress:
            return None  # not ours: `_create` refuses it
        self._check_run(progress)
        self._load_records(backend)
        if not self.records:
            return None  # this run's, with no finished shard: started over by `_create`
        backend.discard_unfinished_writes()
        return backend

    def _join(self) -> ZarrBackend:
        """The partial cache of this run that another process opened, for writing shards."""
        backend = open_backend(self.partial, "r+", "zarr")
        progress = backend.attrs().get(layout.PROGRESS)
        if not isinstance(progress, dict) or "run" not in progress:
            raise PipelineError(f"{self.partial}: not an unfinished cache to write shards into")
        self._check_run(progress)
        self._load_records(backend)
        return backend

    def _check_run(self, progress: dict[str, Any]) -> None:
        if progress["run"] != self.run:
            raise PipelineError(
                f"{self.partial} holds an unfinished run with other settings "
                f"({_differences(progress['run'], self.run)}); re-run its command to resume it, "
                f"or delete {self.partial} to start over"
            )

    def _load_records(self, backend: ZarrBackend) -> None:
        """The finished shards' records (and digests) from their record files."""
        self.records, self._digests = {}, {}
        for k, doc in backend.read_records().items():
            if 0 <= k < self.num_shards and isinstance(doc.get("record"), str):
                self.records[k] = doc["record"]
                for name, digest in (doc.get("digests") or {}).items():
                    self._digests.setdefault(name, {})[k] = digest

    def reload(self) -> None:
        """Read the records again: shards other processes finished since."""
        self._load_records(self._backend)

    def _progress_attr(self) -> dict[str, Any]:
        return {layout.PROGRESS: {"run": self.run}}

    def write_shard(self, k: int, values: Values, record: str = "") -> None:
        """Write shard `k` (any unfinished one) and record it as done with `record`.

        `values` maps each shard node to its decoded rows of the shard, e.g. logits (S, V, C)
        float32 and members/logits (M, S, V, C); S = rows in the shard. Every node is checked
        before any is written.
        """
        if not 0 <= k < self.num_shards or k in self.records:
            raise ValueError(f"shard {k}: not an unfinished shard of {self.num_shards}")
        rows = self.shard(k)
        stored = self._encode_shard(k, rows, values)
        for name, words in stored.items():
            self._backend.write(name, (0,) * self._by_name[name].axis + (rows.start,), words)
            if k == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        digests = {}
        if self._checksums and self.fmt == "zarr":  # HDF5 digests are of the converted file
            digests = {n: self._backend.shard_digests(n, self.shard_rows, [k])[0] for n in stored}
        self._backend.write_record(k, {"record": record, "digests": digests})
        self.records[k] = record
        for name, digest in digests.items():
            self._digests.setdefault(name, {})[k] = digest

    def _encode_shard(self, k: int, rows: slice, values: Values) -> dict[str, np.ndarray]:
        """Shard `k`'s stored words of every shard node, in table order, once all are checked."""
        self._check_node_set(f"shard {k}", values)
        ids = self.sample_ids[rows]
        stored = {}
        for node in self.nodes:
            if node.written != "shard":
                continue
            given = node.checked_values(values[node.name])
            expected = _with_rows(self.shapes[node.name], node.axis, rows.stop - rows.start)
            if given.shape != expected:
                raise ValueError(f"shard {k}: {node.name} {given.shape}, expected {expected}")
            self._refuse_problems(node, given, ids)
            stored[node.name] = node.encode(given, self.dtype)
        return stored

    def _check_node_set(self, what: str, values: Values) -> None:
        if set(values) != set(self.shard_nodes):
            raise ValueError(
                f"{what}: nodes given {sorted(values)}, this cache's shard nodes are "
                f"{sorted(self.shard_nodes)}"
            )

    def add(self, values: Values) -> None:
        """Append the next rows of every shard node, e.g. {"logits": (B, V, C) float32}; whole
        shards are written as soon as they are complete."""
        self._check_node_set("add", values)
        batch = {name: np.asarray(a) for name, a in values.items()}
        counts = {self._by_name[name].num_rows(a) for name, a in batch.items()}
        if len(counts) != 1:
            raise ValueError(f"add: nodes given with different row counts {sorted(counts)}")
        self._pending.append(batch)
        self._pending_rows += counts.pop()
        while left := self.shards_left:
            k = left[0]
            need = self.shard(k).stop - self.shard(k).start
            if self._pending_rows < need:
                break
            joined = {name: self._joined_pending(name) for name in batch}
            head = {name: self._take(name, a, slice(None, need)) for name, a in joined.items()}
            self.write_shard(k, head)
            rest = {name: self._take(name, a, slice(need, None)) for name, a in joined.items()}
            self._pending_rows -= need
            self._pending = [rest] if self._pending_rows else []

    def _joined_pending(self, name: str) -> np.ndarray:
        """The buffered rows of node `name`, as one array."""
        return np.concatenate([p[name] for p in self._pending], axis=self._by_name[name].axis)

    def _take(self, name: str, values: np.ndarray, rows: slice) -> np.ndarray:
        """Rows `rows` of `values` of node `name`."""
        return values[self._by_name[name].index(rows)]

    def finish(self, attrs: dict[str, Any]) -> Path:
        """Add the provenance `attrs`, then `complete`; move the cache into place at `out`."""
        if self.joined:
            raise ValueError("a writer that joined another process's cache does not finish it")
        if self.shards_left or self._pending_rows:
            raise PipelineError(
                f"{self.out}: {self.rows_done + self._pending_rows} rows given, "
                f"expected {self.num_samples} (shards not written: {_ranges(self.shards_left)})"
            )
        final = {**self.base_attrs, **attrs, "complete": True}
        if self.fmt == "zarr":
            if self._checksums:
                final[layout.DIGESTS] = cachecopy.shard_digests(
                    self._backend, self.shard_rows, self._digests, self.base_attrs
                )
                final[layout.ATTRS_DIGEST] = layout.attrs_digest(final)
            # One atomic write of zarr.json adds the provenance and digests, drops the progress
            # record and sets `complete`, after every shard is on disk.
            self._backend.replace_attrs(final)
            self._complete = True  # the partial is now a whole cache: never dropped by abort
            fsutil.kill_point("finish-complete", self.out)
            self._publish()
        else:
            # The partial keeps its progress record: a crash while converting redoes only this.
            self._backend.set_attrs({k: v for k, v in final.items() if k != "complete"})
            with fsutil.journaled_temp(self.out) as tmp:  # this run's own name, never a user's
                cachecopy.copy_cache(self._backend, tmp, "hdf5", checksums=self._checksums)
                self._backend.close()
                fsutil.kill_point("hdf5-converted", self.out)
                kept = f"the finished shards are kept in {self.partial} for a run with --overwrite"
                fsutil.replace(tmp, self.out, self.overwrite, kept, then=(self.partial,))
        self._lock.release()
        return self.out

    def _publish(self) -> None:
        """Move the whole partial Zarr cache into place. Locally one rename, journaled with
        this run's digest; on object storage a copy, after a record of the same digest. A
        run killed while publishing is finished by the next run of the same command."""
        self._backend.drop_records()
        if isinstance(self.out, str):
            self._backend.write_finished(self.run_digest)
            self._backend.close()
            return store.publish(self.partial, self.out)
        self._backend.close()
        kept = f"the finished cache is kept in {self.partial}: move it into place yourself, or "
        kept += "run again with --overwrite"
        fsutil.replace(self.partial, self.out, self.overwrite, kept, keep=True, run=self.run_digest)

    @property
    def run_digest(self) -> str:
        """sha256 of this run's record (`run`): what a finished partial cache is matched by."""
        return hashlib.sha256(json.dumps(self.run, sort_keys=True).encode()).hexdigest()

    def _finish_interrupted(self) -> bool:
        """Publish the whole cache a killed run of this same command left unpublished; undo
        the move of another run's. True when the cache is now in place."""
        if isinstance(self.out, str):
            run = ZarrBackend(self.partial, "r").read_finished() if _complete(self.partial) else 0
            if run == self.run_digest and (self.overwrite or store.read_meta(self.out) is None):
                store.publish(self.partial, self.out)
                return True
            return False
        published = False
        for entry in self._lock.pending:
            swap = entry["swap"]
            old = self.out.with_name(swap["old"])
            mine = (swap["src"], swap["dst"]) == (self.partial.name, self.out.name)
            if mine and swap.get("run") == self.run_digest and _complete(self.partial):
                overwrite = self.overwrite or not store.exists(self.out)
                fsutil.replace(
                    self.partial, self.out, overwrite, then=(old,), keep=True, run=swap["run"]
                )
                published = True
            else:  # another run's: the old cache goes back, the new one is dropped
                if not store.exists(self.out) and store.exists(old):
                    os.replace(old, self.out)
                if store.exists(self.partial) and mine:
                    _remove(self.partial)
        self._lock.settle()
        return published

    def abort(self) -> None:
        """Stop after a failure: keep finished shards for a re-run, or drop an empty partial.

        The previous `out`, if any, is untouched either way. A joined writer leaves the
        partial cache to the process that opened it.
        """
        if self.joined:
            self._backend.close()
            return
        try:
            self.reload()  # shards other processes finished count too
            keep = bool(self.records) or self._complete
        except Exception:
            keep = True  # unknown: keep the partial
        self._backend.close()
        if not keep:
            _remove(self.partial)
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def finished_shards(partial: str | Path) -> dict[int, str]:
    """Shard -> its record, for every shard a run writing the partial cache at `partial`
    (``<out>.partial``) has finished."""
    backend = ZarrBackend(partial, "r")
    return {k: doc["record"] for k, doc in sorted(backend.read_records().items())}


def _with_rows(shape: tuple[int, ...], axis: int, rows: int) -> tuple[int, ...]:
    """`shape` with `rows` rows along `axis`."""
    return shape[:axis] + (rows,) + shape[axis + 1 :]


def _checksums(format_version: int) -> bool:
    """Whether a cache of `format_version` carries checksums (version 1 does not)."""
    if format_version not in layout.READABLE_VERSIONS:
        raise ValueError(f"format_version {format_version}: expected {layout.READABLE_VERSIONS}")
    return format_version >= 2


def _remove(loc: store.Location) -> None:
    if isinstance(loc, str):
        store.remove_url(loc)
    else:
        fsutil.remove(loc)


def _complete(loc: store.Location) -> bool:
    """Whether `loc` holds a whole cache of ours (its root says `complete`)."""
    doc = store.read_meta(loc)
    attrs = doc.get("attributes") if doc else None
    return (
        isinstance(attrs, dict)
        and attrs.get("format") == layout.FORMAT
        and (attrs.get("complete") is True)
    )


class _NoLock:
    pending: list = []

    def acquire(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def release(self) -> None:
        pass


def _ours(path: store.Location) -> bool:
    """Whether `path` (a partial cache's name) is an unfinished cache this tool wrote (a Zarr
    group whose attributes carry our progress record, or a finished one never moved into
    place), or an empty directory: the only things the writer deletes."""
    if isinstance(path, Path) and path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()):
            return True
    doc = store.read_meta(path)
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != layout.FORMAT:
        return False
    progress = attrs.get(layout.PROGRESS)
    # complete: a run killed between its last attribute write and the rename into place
    return isinstance(progress, dict) and "run" in progress or attrs.get("complete") is True


def _ranges(ks: list[int]) -> str:
    """Sorted shard numbers as ranges, e.g. "0-3, 7"."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _sha256(a: np.ndarray) -> str:
    """Digest of stored words, little-endian (int64 nodes: as earlier versions hashed them)."""
    return hashlib.sha256(
        np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    ).hexdigest()


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
