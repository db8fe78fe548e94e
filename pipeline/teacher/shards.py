"""Stage one's inner loop: compute shard after shard, each stored whole while the next runs.

A shard's forward calls are its rows cut at the multiples of `batch_size` (and at its own
ends, `forward_batches`), so they never depend on which process computes it or what it
computed before: a resumed run and every torchrun rank make exactly the calls an uninterrupted
run makes. A background thread stores shard k (its part of the data fingerprint, the combined
members, the sparse or full targets, the features) while the teachers compute shard k+1.
`pipeline.teacher.precompute` drives it.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.cache import CacheWriter, layout, schema
from pipeline.cache.ensemble import combine_members
from pipeline.cache.schema import LOGITS, MEMBER_LOGITS, VIEW_SEEDS, nonfinite_ids
from pipeline.cache.sparse import (
    sample_targets,
    take_values,
    topk_targets,
)
from pipeline.core import distributed
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.core.progress import progress
from pipeline.data import MODULUS, Fingerprint, TransferSet, part
from pipeline.data.views import Views
from pipeline.teacher.features import Extractor, Feature
from pipeline.teacher.teachers import Teacher


def compute_shards(
    cfg: PrecomputeConfig,
    writer: CacheWriter,
    members: list[Teacher],
    ts: TransferSet,
    data: str,
    device,
    views: Views,
    features: list[Feature] | None = None,
    ranks: distributed.Ranks = distributed.SINGLE,
) -> None:
    """Run the teachers over this rank's share of the unfinished shards while a background
    thread stores the previous one; its share of the finished shards is only checked."""
    check = sorted(writer.records)[ranks.rank :: ranks.world]
    todo = writer.shards_left[ranks.rank :: ranks.world]
    rows = sum(writer.shard(k).stop - writer.shard(k).start for k in todo)
    desc = f"precompute (rank {ranks.rank} of {ranks.world})" if ranks.active else "precompute"
    bar = progress(total=rows, desc=desc, unit="sample", disable=not ranks.main or None)
    background = Background()
    extractor = Extractor(features, members[0], device) if features else None
    try:
        with extractor or contextlib.nullcontext():
            for k, pieces in _shards(ts, writer, cfg.batch_size, check + todo):
                if k in writer.records:
                    _check_finished_shard(writer, k, pieces, data)
                    continue
                labels = ts.labels[writer.shard(k)]  # (S,): grad-attention's targets
                with autocast(cfg.precision, device):
                    logits, feats = _forward(
                        members, pieces, device, views, bar.update, extractor, labels
                    )  # (M, S, V, C), {node: (S, V, ...)}
                _refuse_nonfinite(members, logits, np.concatenate([p[0] for p in pieces]))
                job = functools.partial(_store, writer, k, pieces, logits, feats, cfg, views)
                background.submit(job)
    except BaseException as e:
        drain(background)  # queued shards are finished work: let them land for a re-run
        if isinstance(e, PipelineError) and writer.shards_done:
            raise PipelineError(
                f"{e}; the cache is not complete ({writer.shards_done} finished shards "
                f"kept in {writer.partial} for a re-run)"
            ) from None
        raise
    finally:
        bar.close()
    background.join()


def _refuse_nonfinite(members: list[Teacher], logits: np.ndarray, ids: np.ndarray) -> None:
    """Stop at the first member whose logits (M, S, V, C) hold NaN/Inf, naming the ids."""
    for t, member in zip(members, logits, strict=True):
        if bad := nonfinite_ids(member, ids):
            raise PipelineError(f"teacher {t.source} produced NaN/Inf logits for sample ids {bad}")


Pieces = list[tuple[np.ndarray, np.ndarray]]  # (ids (b,), inputs (b, ...)) in row order


def _shards(
    ts: TransferSet, writer: CacheWriter, batch_size: int, shards: list[int]
) -> Iterator[tuple[int, Pieces]]:
    """(k, pieces of shard k) for each shard k of `shards`, in that order, reading only their
    rows. A shard's pieces are its rows cut at the multiples of `batch_size`: the data's own
    batches, split at shard ends, so no forward call mixes rows of two shards and every
    process (rank, resumed run) makes exactly the calls an uninterrupted one makes."""
    plan = [(k, rows) for k in shards for rows in _cuts(writer.shard(k), batch_size)]
    pieces: Pieces = []
    for (k, rows), (ids, x, _) in zip(plan, ts.read_ranges([r for _, r in plan]), strict=True):
        pieces.append((ids, x))
        if rows.stop == writer.shard(k).stop:
            yield k, pieces
            pieces = []


def forward_batches(num_rows: int, shard_rows: int, batch_size: int) -> list[slice]:
    """The rows of every forward call precompute makes over `num_rows` rows stored in shards
    of `shard_rows` (a cache's `shard_rows` attribute): each shard cut at the multiples of
    `batch_size`. CPU kernels may give other bits for other batch shapes, so a reference that
    must equal the cache bit for bit runs the teacher on exactly these batches."""
    shards = layout.shard_ranges(num_rows, shard_rows)
    return [piece for rows in shards for piece in _cuts(rows, batch_size)]


def _cuts(rows: slice, batch_size: int) -> list[slice]:
    """`rows` cut at the multiples of `batch_size`."""
    first = (rows.start // batch_size + 1) * batch_size
    starts = [rows.start, *range(first, rows.stop, batch_size)]
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], rows.stop], strict=True)]


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """Mixed precision for the teachers' forward passes (a no-op for fp32; ONNX teachers run
    in onnxruntime, untouched); the logits are cast to float32 before they are stored."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def _forward(
    members: list[Teacher],
    pieces: Pieces,
    device,
    views: Views,
    on_batch: Callable[[int], Any] | None = None,
    extractor: Extractor | None = None,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every member's raw logits on every view of a shard's pieces, one forward call per piece
    and view, and with an `extractor` the features of each call (`labels` (S,): the shard's);
    `on_batch(rows)` after each piece (the progress bar moves per batch, not per 16384-row
    shard).  # (M, S, V, C), {node: (S, V, ...)}"""
    n = sum(len(ids) for ids, _ in pieces)
    out = np.empty((len(members), n, views.count, members[0].num_classes), np.float32)
    if extractor is not None:
        extractor.start(n, views.count)
    row = 0
    with torch.inference_mode():
        for ids, x in pieces:
            for v, xv in enumerate(views.inputs(x, ids)):  # x itself without augmentation
                xb = to_device(np.ascontiguousarray(xv), device)
                for m, t in enumerate(members):
                    out[m, row : row + len(xb), v] = t(xb).float().cpu().numpy()
                if extractor is not None:  # features of that very call (one member)
                    extractor.collect(row, v, xv, ids, labels[row : row + len(x)])
            row += len(x)
            if on_batch is not None:
                on_batch(len(x))
    return out, ({} if extractor is None else extractor.values)


def to_device(x: np.ndarray, device) -> torch.Tensor:
    """A batch on `device`; to a GPU through pinned memory, copied without blocking the host
    (the next batch is prepared while this one is copied)."""
    xb = torch.from_numpy(x)
    if torch.device(device).type == "cuda":
        return xb.pin_memory().to(device, non_blocking=True)
    return xb.to(device)


def _store(
    writer: CacheWriter,
    k: int,
    pieces: Pieces,
    logits: np.ndarray,  # (M, S, V, C)
    features: dict[str, np.ndarray],  # node -> (S, V, ...)
    cfg: PrecomputeConfig,
    views: Views,
) -> None:
    """Background job: shard k's part of the data fingerprint (raw inputs, not views); combine
    its members, write it with its view seeds and features, recorded with that part."""
    record = _fingerprint_part(writer, k, pieces)
    ids = np.concatenate([p[0] for p in pieces])  # (S,)
    combined = combine_members(logits, cfg.combine, 1.0)  # (S, V, C)
    values = {**_target_values(cfg, combined, ids, views), **features}
    if cfg.keep_members:
        values[MEMBER_LOGITS] = logits
    if views.spec:
        values[VIEW_SEEDS] = views.seeds(ids)  # (S, V)
    writer.write_shard(k, values, record)


def _target_values(
    cfg: PrecomputeConfig, combined: np.ndarray, ids: np.ndarray, views: Views
) -> dict[str, np.ndarray]:
    """A shard's teacher-target nodes from its combined logits (S, V, C): `logits` itself, or
    the sparse nodes (`pipeline.cache.sparse`) computed view by view."""
    s, v, c = combined.shape
    flat = combined.reshape(s * v, c)  # (S·V, C), row i·V + j: sample i, view j
    if cfg.topk:
        values, indices, lse = topk_targets(flat, cfg.topk)  # (S·V, K), (S·V, K), (S·V,)
        return {
            schema.TOPK_VALUES: values.reshape(s, v, -1),
            schema.TOPK_INDICES: indices.reshape(s, v, -1),
            schema.TOPK_LSE: lse.reshape(s, v),
        }
    if not cfg.sample_k:
        return {LOGITS: combined}
    # Each row's draw is seeded by (seed, sample id) alone; with views, by the view's seed.
    row_ids = views.seeds(ids).reshape(-1) if views.spec else ids  # (S·V,)
    indices, counts = sample_targets(flat, cfg.sample_k, cfg.seed, row_ids)  # (S·V, W)
    out = {
        schema.SAMPLE_INDICES: indices.reshape(s, v, -1),
        schema.SAMPLE_COUNTS: counts.reshape(s, v, -1),
    }
    if cfg.sample_values:
        out[schema.SAMPLE_VALUES] = take_values(flat, indices).reshape(s, v, -1)
    return out


def _fingerprint_part(writer: CacheWriter, k: int, pieces: Pieces) -> str:
    """Shard k's part of the data fingerprint (`pipeline.data.part`), as hex: its record."""
    start, total = writer.shard(k).start, 0
    for ids, x in pieces:
        total += part(start, ids, x)
        start += len(ids)
    return f"{total % MODULUS:064x}"


def data_fingerprint(ts: TransferSet, writer: CacheWriter) -> str:
    """The data fingerprint: every shard's recorded part, added up in shard order."""
    fp = Fingerprint(ts.input_shape, str(ts.inputs.dtype))
    for k in range(writer.num_shards):
        rows = writer.shard(k)
        fp.add(int(writer.records[k], 16), rows.stop - rows.start)
    return fp.hexdigest()


def _check_finished_shard(writer: CacheWriter, k: int, pieces: Pieces, data: str) -> None:
    """Compare a resumed run's finished shard's part of the fingerprint with the one recorded
    when it was written: changed data must not be mixed into the old shards."""
    if _fingerprint_part(writer, k, pieces) != writer.records[k]:
        rows = writer.shard(k)
        raise PipelineError(
            f"--data {data} changed since the interrupted run in {writer.partial} "
            f"(rows {rows.start}-{rows.stop - 1} differ); re-run with the original data "
            f"to resume, or delete {writer.partial} to start over"
        )


def drain(background: Background) -> None:
    try:
        background.join()
    except BaseException:
        pass  # the failure being handled is the one to report


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
