"""Spot check of a cache against the live teacher (`pipeline verify --teacher T --sample K`).

Checksums prove the bytes are the ones written; this proves the ones written are the teacher's
outputs: K random rows (seeded) are recomputed on the CPU with the teachers loaded as
precompute loads them, combined as the cache says its members were (`teacher.combine`),
rounded through the cache's dtype, and compared with the stored rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.backends import DamagedData
from pipeline.cache.codec import decode, encode
from pipeline.cache.ensemble import combine_members
from pipeline.cache.reader import TeacherCache
from pipeline.cache.schema import LOGITS, MEMBER_LOGITS
from pipeline.data import TransferSet
from pipeline.errors import PipelineError

DEFAULT_SEED = 0
BATCH_ROWS = 256  # rows per forward call, as precompute's default batch
# float32: CPU against CPU is normally exact; allow what a different batch may change.
FLOAT32_RTOL, FLOAT32_ATOL = 1e-5, 1e-6


def spot_check(
    path: str | Path, ts: TransferSet, teachers: list[str], sample: int, seed: int = DEFAULT_SEED
) -> tuple[list[str], dict[str, Any]]:
    """Recompute `sample` random rows of the cache at `path` (those of `ts` it holds) with
    `teachers` and compare them with the stored logits (and per-member logits, when kept).

    Returns the problems (a mismatch names the sample ids and the largest difference) and a
    summary: rows checked, the seed and the sample ids picked.
    """
    if sample < 1:
        raise PipelineError(f"--sample must be >= 1, got {sample}")
    from pipeline.precompute import load_members  # torch: only when a spot check runs

    members = load_members(list(teachers), ts, "cpu")
    with TeacherCache(path) as cache:
        if problems := _refusals(cache, members[0].num_classes, ts):
            return problems, {"teacher_rows_checked": 0}
        picked = _pick(cache, ts, sample, seed)  # rows of ts, sorted
        ids = ts.sample_ids[picked]
        outputs = _forward(members, ts.inputs[picked])  # (M, S, V, C)
        try:
            problems = _compare_cache(cache, cache.rows_for(ids), outputs, ids)
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
    if cache.num_views != 1:
        # Augmented views are regenerated from views/seed, which this version does not write.
        return [f"teacher spot check: {cache.num_views} views per sample, only 1 is supported"]
    if not np.isin(ts.sample_ids, cache.sample_ids).any():
        return [f"teacher spot check: no sample of --data {ts.spec} is in the cache"]
    return []


def _pick(cache: TeacherCache, ts: TransferSet, sample: int, seed: int) -> np.ndarray:
    """`sample` rows of `ts` whose ids the cache holds, drawn with `seed`, in row order."""
    held = np.flatnonzero(np.isin(ts.sample_ids, cache.sample_ids))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(held, size=min(sample, len(held)), replace=False))


def _forward(members: list, inputs: np.ndarray) -> np.ndarray:
    """Every member's raw logits on `inputs` (S, ...), on the CPU.  # (M, S, 1, C)"""
    import torch

    out = np.empty((len(members), len(inputs), 1, members[0].num_classes), np.float32)
    with torch.inference_mode():
        for start in range(0, len(inputs), BATCH_ROWS):
            x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + BATCH_ROWS]))
            for m, t in enumerate(members):
                out[m, start : start + len(x), 0] = t(x).float().numpy()
    return out


def _compare_cache(
    cache: TeacherCache, rows: np.ndarray, outputs: np.ndarray, ids: np.ndarray
) -> list[str]:
    """The stored logits (and members, when kept and as many) at cache `rows` against the
    recomputed member `outputs` (M, S, V, C)."""
    combine = (cache.attrs.get("teacher") or {}).get("combine") or "mean-logits"
    expected = combine_members(outputs, combine, 1.0)  # (S, V, C), as precompute stores it
    problems = _compare(LOGITS, cache.logits(rows), expected, ids, cache.dtype)
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
