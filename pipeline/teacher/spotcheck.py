"""Spot check of a cache against the live teacher (`pipeline verify --teacher T --sample K`).

Checksums prove the bytes are the ones written; this proves the ones written are the teacher's
outputs: K random rows (seeded) are recomputed on the CPU with the teachers loaded as
precompute loads them, on every view (regenerated from the cache's `views` record, and the
stored `views/seed` compared), combined as the cache says its members were
(`teacher.combine`), and compared with the stored rows:
  * full logits: rounded through the cache's dtype, within one unit of it (float32: a small
    tolerance for what a different batch may change);
  * top-k (`pipeline.cache.sparse.topk_targets` of the recomputed logits): values and lse within
    that tolerance; the classes equal, except that tied logits (equal within it) may come in
    either order;
  * sampled: the draw made again, seeded as precompute seeds it (`draw_ids`): classes and
    counts equal, except a draw that falls within the tolerance of a class boundary may land
    on either side (`draws_match`); values, the recomputed logits of the stored classes,
    within the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.backends import DamagedData
from pipeline.cache.codec import decode, encode
from pipeline.cache.ensemble import combine_members
from pipeline.cache.reader import TeacherCache
from pipeline.cache.schema import (
    LOGITS,
    MEMBER_LOGITS,
    SAMPLE_COUNTS,
    SAMPLE_INDICES,
    SAMPLE_VALUES,
    TOPK_INDICES,
    TOPK_LSE,
    TOPK_VALUES,
    VIEW_SEEDS,
)
from pipeline.cache.sparse import draw_ids, draws_match, sample_targets, take_values, topk_targets
from pipeline.core.errors import PipelineError
from pipeline.data import TransferSet
from pipeline.data.views import Views

DEFAULT_SEED = 0
BATCH_ROWS = 256  # rows per forward call, as precompute's default batch
# float32: CPU against CPU is normally exact; allow what a different batch may change.
FLOAT32_RTOL, FLOAT32_ATOL = 1e-5, 1e-6


def spot_check(
    path: str | Path, ts: TransferSet, teachers: list[str], sample: int, seed: int = DEFAULT_SEED
) -> tuple[list[str], dict[str, Any]]:
    """Recompute `sample` random rows of the cache at `path` (those of `ts` it holds) with
    `teachers` and compare them with the stored targets (full logits, top-k or sampled; and
    per-member logits, when kept).

    Returns the problems (a mismatch names the sample ids and the largest difference) and a
    summary: rows checked, the seed and the sample ids picked.
    """
    if sample < 1:
        raise PipelineError(f"--sample must be >= 1, got {sample}")
    from pipeline.teacher.precompute import load_members  # torch: only when a spot check runs

    members = load_members(list(teachers), ts, "cpu")
    with TeacherCache(path) as cache:
        if problems := _refusals(cache, members[0].num_classes, ts):
            return problems, {"teacher_rows_checked": 0}
        picked = _pick(cache, ts, sample, seed)  # rows of ts, sorted
        ids = ts.sample_ids[picked]
        views = Views.from_attrs(cache.attrs)
        outputs = _forward(members, ts.inputs[picked], ids, views)  # (M, S, V, C)
        try:
            problems = _compare_cache(cache, cache.rows_for(ids), outputs, ids, views)
        except DamagedData as e:
            problems = [f"teacher spot check not done: {e.short}"]
    summary = {
        "teacher_rows_checked": len(picked),
        "teacher_sample_seed": seed,
        "teacher_sample_ids": ids.tolist(),
    }
    return problems, summary


def _refusals(cache: TeacherCache, num_classes: int, ts: TransferSet) -> list[str]:
    """Why the rows cannot be compared at all, if they cannot."""
    if num_classes != cache.num_classes:
        return [
            f"--teacher outputs {num_classes} classes, the cache holds {cache.num_classes}: "
            "not the teacher of this cache"
        ]
    if not np.isin(ts.sample_ids, cache.sample_ids).any():
        return [f"teacher spot check: no sample of --data {ts.spec} is in the cache"]
    return []


def _pick(cache: TeacherCache, ts: TransferSet, sample: int, seed: int) -> np.ndarray:
    """`sample` rows of `ts` whose ids the cache holds, drawn with `seed`, in row order."""
    held = np.flatnonzero(np.isin(ts.sample_ids, cache.sample_ids))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(held, size=min(sample, len(held)), replace=False))


def _forward(members: list, inputs: np.ndarray, ids: np.ndarray, views: Views) -> np.ndarray:
    """Every member's raw logits on every view of `inputs` (S, ...) with sample ids `ids`
    (S,), on the CPU.  # (M, S, V, C)"""
    import torch

    out = np.empty((len(members), len(inputs), views.count, members[0].num_classes), np.float32)
    with torch.inference_mode():
        for start in range(0, len(inputs), BATCH_ROWS):
            batch = slice(start, start + BATCH_ROWS)
            for v, xv in enumerate(views.inputs(inputs[batch], ids[batch])):
                x = torch.from_numpy(np.ascontiguousarray(xv))
                for m, t in enumerate(members):
                    out[m, start : start + len(x), v] = t(x).float().numpy()
    return out


def _compare_cache(
    cache: TeacherCache, rows: np.ndarray, outputs: np.ndarray, ids: np.ndarray, views: Views
) -> list[str]:
    """The stored targets (and members, when kept and as many; and the views' seeds) at cache
    `rows` against the recomputed member `outputs` (M, S, V, C)."""
    combine = (cache.attrs.get("teacher") or {}).get("combine") or "mean-logits"
    expected = combine_members(outputs, combine, 1.0)  # (S, V, C), as precompute stores it
    seeds = views.seeds(ids) if views.spec else None  # (S, V), as precompute stores them
    problems = []
    if seeds is not None and (bad := (cache.view_seeds(rows) != seeds).any(1)).any():
        problems.append(_mismatch(VIEW_SEEDS, bad, ids))
    if cache.target_kind == "topk":
        problems += _compare_topk(cache, rows, expected, ids)
    elif cache.target_kind == "sampled":
        problems += _compare_sampled(cache, rows, expected, ids, seeds)
    else:
        problems += _compare(LOGITS, cache.logits(rows), expected, ids, cache.dtype)
    if cache.has_members and cache.num_members == len(outputs):
        stored = cache.member_logits(rows)  # (M, S, V, C)
        for m in range(len(outputs)):
            found = _compare(MEMBER_LOGITS, stored[m], outputs[m], ids, cache.dtype)
            problems += [f"{p} (member {m})" for p in found]
    elif cache.has_members:
        problems.append(
            f"teacher spot check: {len(outputs)} --teacher given, the cache kept "
            f"{cache.num_members} members"
        )
    return problems


def _compare_topk(
    cache: TeacherCache, rows: np.ndarray, expected: np.ndarray, ids: np.ndarray
) -> list[str]:
    """Stored top-k nodes against `topk_targets` of the recomputed logits `expected`
    (S, V, C). A stored class other than the recomputed one is a tie, not a mismatch, when
    the teacher's logit for it equals the recomputed value there within the tolerance (and
    the row's classes are distinct)."""
    values, indices, lse = cache.topk(rows)  # (S, V, K), (S, V, K), (S, V)
    s, v, c = expected.shape
    want_v, want_i, want_lse = topk_targets(expected.reshape(s * v, c), values.shape[-1])
    want_v, want_i = want_v.reshape(values.shape), want_i.reshape(values.shape)
    problems = _compare(TOPK_VALUES, values, want_v, ids, "float32")
    problems += _compare(TOPK_LSE, lse, want_lse.reshape(lse.shape), ids, "float32")
    stored = indices.astype(np.int64)
    inside = (stored >= 0) & (stored < c)
    at_stored = np.take_along_axis(expected, np.where(inside, stored, 0), -1)  # (S, V, K)
    tie = inside & (np.abs(at_stored - want_v) <= _tolerance(want_v, "float32"))
    ordered = np.sort(stored, -1)
    distinct = (np.diff(ordered, axis=-1) != 0).all(-1, keepdims=True)  # (S, V, 1)
    bad = ((stored != want_i) & ~tie) | ~distinct
    if bad.any():
        problems.append(_mismatch(TOPK_INDICES, bad.reshape(len(ids), -1).any(1), ids))
    return problems


def _compare_sampled(
    cache: TeacherCache,
    rows: np.ndarray,
    expected: np.ndarray,
    ids: np.ndarray,
    seeds: np.ndarray | None,
) -> list[str]:
    """Stored sampled nodes against the draw made again from the recomputed logits
    `expected` (S, V, C), each row seeded as precompute seeded it (`seeds` (S, V): the
    views' seeds when augmented)."""
    record = cache.attrs.get("sample") or {}
    k, seed = int(record["k"]), int(record["seed"])
    tp = float(record.get("proposal_temperature", 1.0))
    stored = cache.sampled(rows)  # node -> (S, V, W)
    s, v, c = expected.shape
    flat, row_ids = expected.reshape(s * v, c), draw_ids(ids, seeds)  # (S·V, C), (S·V,)
    indices, counts = (stored[n].reshape(s * v, -1) for n in (SAMPLE_INDICES, SAMPLE_COUNTS))
    want_i, want_c = sample_targets(flat, k, seed, row_ids, proposal_temperature=tp)
    exact = (indices == want_i).all(1) & (counts == want_c).all(1)  # (S·V,)
    ok = exact.copy()
    if not exact.all():  # recomputed logits move the class boundaries by their rounding
        slack = np.expm1(2 * _tolerance(flat, "float32").max(1) / tp)  # (S·V,)
        rest = ~exact
        args = (flat[rest], k, seed, row_ids[rest], indices[rest], counts[rest])
        ok[rest] = draws_match(*args, proposal_temperature=tp, slack=slack[rest])
    problems = []
    if not ok.all():
        wrong_classes = ~ok & ~(indices == want_i).all(1)
        for name, bad in ((SAMPLE_INDICES, wrong_classes), (SAMPLE_COUNTS, ~ok & ~wrong_classes)):
            if bad.any():
                problems.append(_mismatch(name, bad.reshape(s, v).any(1), ids))
    if SAMPLE_VALUES in stored:
        drawn = np.clip(indices.astype(np.int64), 0, c - 1)  # out of range: a bad index above
        want_v = take_values(flat, drawn).reshape(s, v, -1)  # the logits of the stored classes
        problems += _compare(SAMPLE_VALUES, stored[SAMPLE_VALUES], want_v, ids, "float32")
    return problems


def _mismatch(name: str, bad: np.ndarray, ids: np.ndarray) -> str:
    """One line naming node `name` and the sample ids of the `bad` (S,) rows."""
    return (
        f"teacher spot check: {name} of {int(bad.sum())} of {len(ids)} sampled rows differ "
        f"from --teacher (sample ids {ids[bad][:5].tolist()})"
    )


def _compare(
    name: str, stored: np.ndarray, computed: np.ndarray, ids: np.ndarray, dtype: str
) -> list[str]:
    """Rows (S, V, C) of `stored` against `computed` float32 rounded through `dtype`: float32
    within FLOAT32_RTOL/ATOL, float16 and bfloat16 within one unit of their precision."""
    expected = decode(encode(computed, dtype), dtype)
    diff = np.abs(stored.astype(np.float64) - expected.astype(np.float64))
    allowed = _tolerance(expected, dtype)
    bad_value = ~(diff <= allowed)  # NaN is a mismatch too
    bad = bad_value.reshape(len(ids), -1).any(axis=1)
    if not bad.any():
        return []
    worst = np.nan_to_num(np.where(bad_value, diff, 0), nan=np.inf).reshape(len(ids), -1)
    row = int(worst.max(axis=1).argmax())
    return [
        f"teacher spot check: {name} of {int(bad.sum())} of {len(ids)} sampled rows differ "
        f"from --teacher (sample ids {ids[bad][:5].tolist()}; largest difference "
        f"{worst[row].max():.4g} at sample id {ids[row]})"
    ]


def _tolerance(expected: np.ndarray, dtype: str) -> np.ndarray:
    """What a stored value may differ from `expected` by: the float32 tolerance, or one unit
    in the last place of the cache's 16-bit dtype at that magnitude."""
    magnitude = np.abs(expected.astype(np.float32))
    if dtype == "float16":
        return np.spacing(magnitude.astype(np.float16)).astype(np.float64)
    if dtype == "bfloat16":
        # bfloat16 keeps float32's exponent and 7 of its 23 mantissa bits: 2**16 float32 ulps.
        return np.spacing(magnitude).astype(np.float64) * 2.0**16
    return FLOAT32_ATOL + FLOAT32_RTOL * magnitude.astype(np.float64)
