"""Teacher targets for training students, read from a cache without the teacher.

The cache is joined to the transfer set by sample id (never by position). Its rows are read a
shard at a time, in whole ranges (never row by row: zarr costs about 1 ms per call). When the
rows a student needs fit the memory budget they are loaded once (`MemoryTargets`); otherwise
every epoch streams the shards in a seeded random order through a bounded shuffle buffer
(`StreamTargets`). Both give the same epoch: every row once, with the same targets.

Views: a cache of V augmented views holds the teacher's logits on each view and the view's
seed. With a `ViewPlan`, epoch e serves row r's view (e + offset[r]) mod V, offset seeded per
sample, with its seed (`TargetBatch.seeds`), so the trainer regenerates exactly the input the
teacher saw (`pipeline.data.views.apply_views`). Without one, view 0.

Sparse targets: a top-k or sampled cache (`--topk K`, `--sample-k K`) holds no `logits`; each
shard read is turned into one row per class and view (`TeacherCache.dense`), served like logits,
in memory and streamed, under a view plan too:
  * top-k: the dense logits `pipeline.cache.sparse.topk_logits` rebuilds (kept logits exact, every
    tail class the log-mean-exp of the tail), so every loss that reads the teacher only
    through softmax(t / T) runs unchanged at any T. C floats per view, as full logits.
  * sampled: the planes `pipeline.cache.sparse.sampled_planes` spreads (P, C): the draws' counts,
    and with `sample/values` the drawn classes' logits. `Targets.teacher` turns a batch of them into
    the target distribution at the student's T (`planes_distribution`), which a loss bound for
    a "distribution" (`Targets.form`, kd and soft: `pipeline.student.losses`) trains from.
`pipeline.student.checks.check_targets_for_loss` refuses, before anything is read, the losses
(and the temperatures) a cache's sparse targets cannot train.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import TeacherCache, layout, open_cache
from pipeline.cache.ensemble import combine_members
from pipeline.cache.sparse import (
    planes_distribution,
)
from pipeline.core.device import epoch_rng
from pipeline.core.errors import PipelineError
from pipeline.data import TransferSet
from pipeline.student.checks import check_combine, check_opened, sample_record, stored_combine

DEFAULT_BUDGET = "2GiB"
# Peak bytes while reading a shard, in multiples of its stored size (benchmarks/bench_students.py
# measures the streaming peak against the budget).
READ_COPIES = {"zarr": 4, "hdf5": 1}


def parse_size(value: int | str, option: str = "--cache-memory") -> int:
    """Bytes in `value`: an int, or a number with a unit (512MiB, 2GiB, 1.5GB, 100k)."""
    return layout.parse_size(value, option)


format_size = layout.format_size


@dataclass
class TargetBatch:
    """Teacher outputs for one batch, raw (T = 1), on the CPU."""

    # (B, C) combined at precompute (mean of the members' logits), or rebuilt from top-k;
    # (B, P, C) for a sampled cache: counts and, with values, logits (`sampled_planes`)
    logits: torch.Tensor
    members: torch.Tensor | None = None  # (M, B, C) per-member logits, when read
    seeds: np.ndarray | None = None  # (B,) seed of each row's view, when views are augmented
    features: dict[str, torch.Tensor] | None = None  # name -> (B, ...) of each row's view


_PLAN_TAG = 0x504C414E00000000  # "PLAN"


@dataclass(frozen=True)
class ViewPlan:
    """Which cached view each row trains on: at epoch e, view (e + offsets[row]) mod count, so
    every view comes round once per `count` epochs, and fewer views than epochs cycle."""

    count: int  # views used: the first `count` of the cache's
    offsets: np.ndarray  # (N,) per row of the targets, from (seed, sample id) alone

    def of(self, rows: np.ndarray, epoch: int) -> np.ndarray:  # (B,)
        return (epoch + self.offsets[rows]) % self.count


def plan_views(count: int, sample_ids: np.ndarray, seed: int) -> ViewPlan:
    """The plan for rows with `sample_ids` (in the targets' row order): each sample's offset
    is a function of (seed, sample id), never of its row or batch."""
    from pipeline.data.views import view_seeds

    # A tag keeps the offsets apart from the views' own seeds when the two seeds are equal.
    tagged = (int(seed) ^ _PLAN_TAG) & 0xFFFFFFFFFFFFFFFF
    offsets = view_seeds(tagged, sample_ids, 1)[:, 0].view(np.uint64) % np.uint64(count)
    return ViewPlan(count, offsets.astype(np.int64))


class Targets:
    """Rows of the transfer set with their teacher targets, served a batch at a time."""

    mode: str  # "memory" or "stream"
    num_rows: int
    num_views: int  # views held per row (all of the cache's)
    num_classes: int
    stored_combine: str  # how precompute combined the members into `logits`
    plan: ViewPlan | None = None  # None: view 0 of every row
    sample: dict[str, Any] | None = None  # a sampled cache's `sample` attribute, else None

    @property
    def form(self) -> str:
        """What `teacher` gives: "logits" (full or rebuilt from top-k), or a "distribution"
        at T (sampled targets); a loss is bound for it (`LossSpec.bind`)."""
        return "logits" if self.sample is None else "distribution"

    def with_plan(self, plan: ViewPlan) -> Targets:
        """The same targets served by `plan` (which view of each row, each epoch)."""
        if plan.count > self.num_views:
            raise PipelineError(f"{plan.count} views asked, the cache holds {self.num_views}")
        if len(plan.offsets) != self.num_rows:
            raise PipelineError(f"a view plan of {len(plan.offsets)} rows for {self.num_rows}")
        out = copy.copy(self)
        out.plan = plan
        return out

    def _views(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """The view each of `rows` trains on at `epoch`.  # (B,)"""
        if self.plan is None:
            return np.zeros(len(rows), np.int64)
        return self.plan.of(rows, epoch)

    def epoch(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[np.ndarray, TargetBatch]]:
        """(rows of the transfer set (B,), their targets) for every row once, shuffled."""
        raise NotImplementedError

    def restrict(self, rows: np.ndarray) -> Targets:
        """The targets of `rows` of the transfer set alone, renumbered 0..len(rows)-1 in that
        order (what a held-out slice leaves to train on).  # rows (K,)"""
        raise NotImplementedError

    def teacher(self, batch: TargetBatch, method: str, temperature: float) -> torch.Tensor:
        """The teacher's logits for `batch`, its members combined by `method` at
        `temperature`: softmax(out / T) is the combined distribution; from a sampled cache,
        that distribution's estimate itself (`form` "distribution").  # (B, C)"""
        if self.sample is not None:  # precompute keeps no members with sparse targets
            tp = float(self.sample.get("proposal_temperature", 1.0))
            return planes_distribution(batch.logits, temperature, proposal_temperature=tp)
        if method == self.stored_combine == "mean-logits":
            return batch.logits  # what precompute stored; exact, and no members needed
        if batch.members is None:
            raise PipelineError(f"--combine {method}: the members were not read")
        return torch.from_numpy(combine_members(batch.members.numpy(), method, temperature))


class MemoryTargets(Targets):
    """Every row's targets held in memory; an epoch is a seeded permutation of the rows."""

    mode = "memory"

    def __init__(
        self,
        logits: np.ndarray,
        members: np.ndarray | None = None,
        stored_combine: str = "mean-logits",
        seeds: np.ndarray | None = None,
        features: dict[str, np.ndarray] | None = None,
        sample: dict[str, Any] | None = None,
    ):
        """`logits` (N, V, C) or (N, C) for one view, (N, V, P, C) for a sampled cache
        (`sample`: its attribute); `members` (M, N, V, C) or (M, N, C); `seeds` (N, V) when
        the views are augmented; `features` name -> (N, V, ...)."""
        self.stored_combine, self.sample = stored_combine, sample
        logits = np.asarray(logits)
        if logits.ndim == 2:
            logits = logits[:, None]
            members = None if members is None else np.asarray(members)[:, :, None]
        self.logits = torch.from_numpy(np.ascontiguousarray(logits))  # (N, V, [P,] C)
        self.members = None if members is None else torch.from_numpy(members)  # (M, N, V, C)
        self.seeds = seeds  # (N, V) or None
        self.features = {k: torch.from_numpy(v) for k, v in (features or {}).items()}
        self.num_rows, self.num_views = self.logits.shape[:2]
        self.num_classes = self.logits.shape[-1]

    def restrict(self, rows):
        rows = np.asarray(rows, np.int64)
        idx = torch.from_numpy(rows)
        members = None if self.members is None else self.members[:, idx].numpy()
        seeds = None if self.seeds is None else self.seeds[rows]
        features = {k: v[idx].numpy() for k, v in self.features.items()}
        logits = self.logits[idx].numpy()
        out = MemoryTargets(logits, members, self.stored_combine, seeds, features, self.sample)
        if self.plan is not None:
            out.plan = ViewPlan(self.plan.count, self.plan.offsets[rows])
        return out

    def epoch(self, epoch, batch_size, seed):
        order = epoch_rng(seed, epoch).permutation(self.num_rows)
        for start in range(0, self.num_rows, batch_size):
            rows = order[start : start + batch_size]
            views = self._views(rows, epoch)
            r, v = torch.from_numpy(rows), torch.from_numpy(views)
            members = None if self.members is None else self.members[:, r, v]
            seeds = None if self.seeds is None else self.seeds[rows, views]
            features = {k: f[r, v] for k, f in self.features.items()} or None
            yield rows, TargetBatch(self.logits[r, v], members, seeds, features)


class StreamTargets(Targets):
    """Targets read shard by shard each epoch, mixed through a shuffle buffer of fixed size.

    Memory: one shard being read plus `buffer_rows` buffered rows, whatever the cache size.
    Shards are visited in a seeded random order; each batch is drawn uniformly from the buffer.
    """

    mode = "stream"

    def __init__(
        self,
        path: Path,
        ts_row_of: np.ndarray,  # (N_cache,) row of the transfer set, -1 where unused
        shard_rows: int,
        num_classes: int,
        num_members: int,
        buffer_rows: int,
        stored_combine: str = "mean-logits",
        num_views: int = 1,
        seeds: bool = False,
        sample: dict[str, Any] | None = None,
        identity: str | None = None,
    ):
        self.stored_combine, self.sample = stored_combine, sample
        self.path = Path(path)
        self.identity = identity  # the cache opened first: every epoch's must be the same
        self.ts_row_of = ts_row_of
        self.shard_rows = shard_rows
        self.num_classes = num_classes
        self.num_members = num_members
        self.buffer_rows = buffer_rows
        self.num_views = num_views
        self.has_seeds = seeds  # read views/seed with the logits
        self.num_rows = int((ts_row_of >= 0).sum())
        # Shards holding no row of the transfer set are never read.
        ranges = layout.shard_ranges(len(ts_row_of), shard_rows)
        self.shards = [rows for rows in ranges if (ts_row_of[rows] >= 0).any()]

    def restrict(self, rows):
        renumber = np.full(int(self.ts_row_of.max()) + 1, -1, np.int64)
        renumber[rows] = np.arange(len(rows))
        used = self.ts_row_of >= 0
        ts_row_of = np.full_like(self.ts_row_of, -1)
        ts_row_of[used] = renumber[self.ts_row_of[used]]
        out = StreamTargets(
            self.path,
            ts_row_of,
            self.shard_rows,
            self.num_classes,
            self.num_members,
            min(self.buffer_rows, len(rows)),
            self.stored_combine,
            self.num_views,
            self.has_seeds,
            self.sample,
            self.identity,
        )
        if self.plan is not None:
            out.plan = ViewPlan(self.plan.count, self.plan.offsets[rows])
        return out

    def epoch(self, epoch, batch_size, seed):
        if self.buffer_rows < min(self.shard_rows + batch_size, self.num_rows):
            raise PipelineError(
                f"the cache memory budget buffers {self.buffer_rows} rows, fewer than one shard "
                f"({self.shard_rows} rows) plus one batch ({batch_size}): raise --cache-memory"
            )
        rng = epoch_rng(seed, epoch)
        row = _row_shape(self.num_classes, self.sample)
        buf = _ShuffleBuffer(self.buffer_rows, row, self.num_classes, self.num_members)
        with open_cache(self.path) as cache:
            if self.identity is not None:
                cache.require_identity(self.identity, "this run started training from")
            for shard in rng.permutation(len(self.shards)):
                rows = self.shards[shard]
                ts_rows = self.ts_row_of[rows]
                keep = ts_rows >= 0
                logits, members, seeds = read_rows(
                    cache, rows, self.num_members > 0, self.has_seeds
                )
                while buf.size + int(keep.sum()) > buf.capacity:
                    yield buf.pop(batch_size, rng)
                kept = np.flatnonzero(keep)
                views = self._views(ts_rows[kept], epoch)  # (k,) each kept row's view this epoch
                buf.push(
                    ts_rows[kept],
                    logits[kept, views],
                    None if members is None else members[:, kept, views],
                    None if seeds is None else seeds[kept, views],
                )
            while buf.size:
                yield buf.pop(min(batch_size, buf.size), rng)


class _ShuffleBuffer:
    """Fixed-size arrays of buffered rows; `pop` draws a batch uniformly without replacement
    and fills the holes from the end, so nothing is ever reallocated."""

    def __init__(self, capacity: int, row: tuple[int, ...], num_classes: int, num_members: int):
        """`row`: the shape of one row's targets, (C,) or a sampled cache's (P, C)."""
        self.capacity, self.size = capacity, 0
        self.rows = np.empty(capacity, np.int64)
        self.logits = np.empty((capacity, *row), np.float32)
        self.members = np.empty((num_members, capacity, num_classes), np.float32)
        self.seeds: np.ndarray | None = None  # (capacity,) once rows with view seeds arrive

    def push(
        self,
        rows: np.ndarray,
        logits: np.ndarray,
        members: np.ndarray | None,
        seeds: np.ndarray | None = None,
    ) -> None:
        end = self.size + len(rows)
        self.rows[self.size : end] = rows
        self.logits[self.size : end] = logits
        if members is not None:
            self.members[:, self.size : end] = members
        if seeds is not None:
            if self.seeds is None:
                self.seeds = np.empty(self.capacity, np.int64)
            self.seeds[self.size : end] = seeds
        self.size = end

    def pop(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, TargetBatch]:
        take = rng.choice(self.size, size=n, replace=False)
        rows, logits = self.rows[take], self.logits[take]
        members = self.members[:, take] if len(self.members) else None
        seeds = None if self.seeds is None else self.seeds[take]
        end = self.size - n
        holes = take[take < end]  # taken slots below the new end...
        movers = np.setdiff1d(np.arange(end, self.size), take)  # ...get the untaken tail
        self.rows[holes], self.logits[holes] = self.rows[movers], self.logits[movers]
        if len(self.members):
            self.members[:, holes] = self.members[:, movers]
        if self.seeds is not None:
            self.seeds[holes] = self.seeds[movers]
        self.size = end
        batch = TargetBatch(
            torch.from_numpy(logits), None if members is None else torch.from_numpy(members), seeds
        )
        return rows, batch


def read_rows(
    cache: TeacherCache, rows: slice, members: bool, seeds: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Every view of a row range, one read per array: the targets (`TeacherCache.dense`), the
    members' logits if `members`, the views' seeds if `seeds`.
    # (n, V, [P,] C), (M, n, V, C) | None, (n, V) | None"""
    logits = cache.dense(rows)
    return (
        logits,
        cache.member_logits(rows) if members else None,
        cache.view_seeds(rows) if seeds else None,
    )


def open_targets(
    path: str | Path,
    ts: TransferSet,
    *,
    cross_modal: bool = False,
    combine: tuple[str, ...] = ("mean-logits",),
    budget: int | str = DEFAULT_BUDGET,
    mode: str = "auto",
    features: tuple[str, ...] = (),
    check: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Targets, dict[str, Any]]:
    """Teacher targets of the rows of `ts`, in memory when they fit `budget`, else streamed
    (`mode` "memory" or "stream" forces one).

    Refuses an incomplete cache and one built from other data. `cross_modal` (the teacher saw
    another modality of the same samples) skips the fingerprint check: every id of `ts` must
    still be in the cache. `combine` lists the methods students will ask for; the members are
    read only if one of them needs them. `features`: feature targets to read too (held in
    memory: feature losses do not stream). `check(attrs)`: run on a sound cache before any
    target is read (the losses' refusals). Returns (targets, cache attributes)."""
    limit = parse_size(budget)
    with open_cache(path) as cache:
        check_opened(cache, ts, cross_modal, check)
        members = any([check_combine(m, cache) for m in combine])
        combined = stored_combine(cache)
        num_members = cache.num_members if members else 0
        ts_row_of = _ts_row_of(cache, ts)  # (N_cache,)
        shard_rows = int(cache.attrs.get("shard_rows") or cache.num_samples) or 1
        read_bytes, row_bytes, stream_row_bytes = _footprint(cache, shard_rows, num_members)
        need = len(ts) * row_bytes + read_bytes
        if mode not in ("auto", "memory", "stream"):
            raise PipelineError(f"targets mode {mode!r}: expected auto, memory or stream")
        need += len(ts) * sum(_feature_bytes(cache, f) for f in features)
        if mode == "memory" or (mode == "auto" and need <= limit) or features:
            _check_features_fit(features, mode, need, limit, path)
            targets = _load_all(cache, ts_row_of, len(ts), shard_rows, members, combined)
            targets.features = {f: _feature_rows(cache, f, ts_row_of) for f in features}
            return targets, cache.attrs
        row_bytes = stream_row_bytes  # the shuffle buffer holds one view per row
        if (one_shard := read_bytes + shard_rows * row_bytes) > limit:
            raise PipelineError(
                f"--cache-memory {format_size(limit)} is too small for one shard of {path} "
                f"({shard_rows} rows, {format_size(one_shard)} to read and buffer); "
                f"give at least {format_size(one_shard + row_bytes * 256)}"
            )
        buffer_rows = min((limit - read_bytes) // row_bytes, len(ts))  # never more than all rows
        targets = StreamTargets(
            Path(path),
            ts_row_of,
            shard_rows,
            cache.num_classes,
            num_members,
            buffer_rows,
            combined,
            cache.num_views,
            cache.has_view_seeds,
            sample_record(cache.attrs),
            cache.identity,
        )
        return targets, cache.attrs


def _check_features_fit(
    features: tuple[str, ...], mode: str, need: int, limit: int, path: str | Path
) -> None:
    """Feature losses read their targets from memory: refuse when they exceed the budget."""
    if features and mode != "memory" and need > limit:
        raise PipelineError(
            f"feature losses hold their targets in memory: {format_size(need)} for {path}, "
            f"more than --cache-memory {format_size(limit)} (raise it)"
        )


def _feature_bytes(cache: TeacherCache, name: str) -> int:
    """Bytes of one row's feature `name` held as float32, every view."""
    cache.feature(name, slice(0, 0))  # a feature the cache lacks: the reader's error
    shape = cache.features[name]["shape"]  # per sample and view
    return 4 * cache.num_views * int(np.prod(shape))


def _feature_rows(cache: TeacherCache, name: str, ts_row_of: np.ndarray) -> torch.Tensor:
    """Feature `name` of every row of the transfer set, as float32.  # (N_ts, V, ...)"""
    used = np.flatnonzero(ts_row_of >= 0)
    values = cache.feature(name, used)  # (n, V, ...) in cache-row order
    out = np.empty((int(ts_row_of.max()) + 1, *values.shape[1:]), np.float32)
    out[ts_row_of[used]] = values
    return torch.from_numpy(out)


def _row_shape(num_classes: int, sample: dict[str, Any] | None) -> tuple[int, ...]:
    """The shape of one row's served targets: (C,) logits, or a sampled cache's (P, C)
    planes (P = 2 with `sample/values`)."""
    if sample is None:
        return (num_classes,)
    return (2 if sample.get("values") else 1, num_classes)


def _footprint(cache: TeacherCache, shard_rows: int, num_members: int) -> tuple[int, int, int]:
    """Bytes to read one shard, to hold one row's targets in memory (every view) and in the
    shuffle buffer (one view)."""
    # A sampled cache's row takes P floats per class (`sampled_planes`), the rest one.
    c = int(np.prod(_row_shape(cache.num_classes, sample_record(cache.attrs))))
    v = cache.num_views
    arrays = 1 + num_members
    stored = 4 if cache.dtype == "float32" else 2
    # Reading a shard holds, at its peak, READ_COPIES times its stored words (measured: zarr
    # keeps the compressed shard, the decoded chunks and the assembled array), their float32
    # decoding (none for float32) and the kept rows.
    decoded = 0 if stored == 4 else 4
    copies = READ_COPIES.get(cache.format, 4)
    read_bytes = shard_rows * c * (v * (copies * stored + decoded) + 4) * arrays
    seed_bytes = 8 if cache.has_view_seeds else 0
    row_bytes = (4 * c * arrays + seed_bytes) * v + 8  # float32 targets + the row index
    return read_bytes, row_bytes, 4 * c * arrays + seed_bytes + 8


def _ts_row_of(cache: TeacherCache, ts: TransferSet) -> np.ndarray:
    """The row of `ts` each cache row holds, -1 where `ts` does not use it (joined by sample
    id; an id of `ts` the cache lacks is an error).  # (N_cache,)"""
    ts_row_of = np.full(cache.num_samples, -1, np.int64)
    ts_row_of[cache.rows_for(ts.sample_ids)] = np.arange(len(ts))
    return ts_row_of


def _load_all(
    cache: TeacherCache,
    ts_row_of: np.ndarray,
    n: int,
    shard_rows: int,
    members: bool,
    combined: str,
) -> MemoryTargets:
    """Read the needed shards in order, one range read each, into arrays indexed by ts row."""
    v, c, sample = cache.num_views, cache.num_classes, sample_record(cache.attrs)
    logits = np.empty((n, v, *_row_shape(c, sample)), np.float32)
    member_arr = np.empty((cache.num_members, n, v, c), np.float32) if members else None
    seeds = np.empty((n, v), np.int64) if cache.has_view_seeds else None
    for rows in layout.shard_ranges(cache.num_samples, shard_rows):
        ts_rows = ts_row_of[rows]
        keep = ts_rows >= 0
        if not keep.any():
            continue
        block, block_members, block_seeds = read_rows(cache, rows, members, seeds is not None)
        logits[ts_rows[keep]] = block[keep]
        if member_arr is not None:
            member_arr[:, ts_rows[keep]] = block_members[:, keep]
        if seeds is not None:
            seeds[ts_rows[keep]] = block_seeds[keep]
    return MemoryTargets(logits, member_arr, combined, seeds, sample=sample)
