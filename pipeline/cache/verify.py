"""Checking a cache end to end: storage, attributes, shapes, values (`pipeline verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout
from pipeline.cache.codec import decode
from pipeline.cache.reader import TeacherCache
from pipeline.cache.writer import nonfinite_ids
from pipeline.errors import one_line

PROVENANCE = ("class_names", "teacher", "data", "params", "created_with", "created_at")


def check_cache(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Every problem found in the cache at `path`, and a summary of what was checked.

    Problems: incomplete; missing attributes; array shapes or stored dtypes that disagree with
    the attributes; a shard file (Zarr) or chunk (HDF5) missing or unreadable; NaN/Inf in the
    logits; duplicate sample ids; labels outside [-1, C).
    """
    with TeacherCache(path) as cache:
        return _check(cache)


def _check(cache: TeacherCache) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    attrs, backend = cache.attrs, cache.backend
    if not cache.complete:
        problems.append("not complete (its precompute run did not finish)")
    missing = [
        k for k in ("num_samples", "num_views", "num_classes", "logits_dtype") if k not in attrs
    ]
    if missing:
        problems.append(f"attributes missing: {', '.join(missing)}")
        return problems, {}
    if cache.complete:
        gone = [
            k for k in (*PROVENANCE, "compression", "chunk_rows", "shard_rows") if k not in attrs
        ]
        if gone:
            problems.append(f"attributes missing: {', '.join(gone)}")
    n, v, c = cache.num_samples, cache.num_views, cache.num_classes
    members = (attrs.get("teacher") or {}).get("members") or []
    m = cache.num_members
    expected = {
        layout.LOGITS: ((n, v, c), layout.stored_dtype(cache.dtype)),
        layout.SAMPLE_IDS: ((n,), np.dtype(np.int64)),
        layout.LABELS: ((n,), np.dtype(np.int64)),
    }
    if attrs.get("num_members", m) != m:
        problems.append(f"attribute num_members is {attrs['num_members']}, members/logits has {m}")
    if m:
        expected[layout.MEMBER_LOGITS] = ((m, n, v, c), layout.stored_dtype(cache.dtype))
        if members and len(members) != m:
            problems.append(
                f"{layout.MEMBER_LOGITS} has {m} members, attribute teacher {len(members)}"
            )
    names = attrs.get("class_names")
    if names is not None and len(names) != c:
        problems.append(f"class_names has {len(names)} names for {c} classes")

    readable = []
    for name, (shape, word) in expected.items():
        if not backend.has(name):
            problems.append(f"{name}: array missing")
            continue
        got_shape, got_word = backend.shape(name), backend.dtype(name)
        if got_shape != shape or got_word != word:
            problems.append(f"{name}: {got_shape} {got_word}, attributes say {shape} {word}")
            continue
        lost = backend.missing_blocks(name)
        for start, stop in lost[:3]:
            problems.append(f"{name}: rows {start}-{stop - 1} missing (no stored shard/chunk)")
        if len(lost) > 3:
            problems.append(f"{name}: {len(lost) - 3} more missing shards")
        if not lost:
            readable.append(name)

    ids = backend.read(layout.SAMPLE_IDS) if layout.SAMPLE_IDS in readable else None
    if ids is not None and len(np.unique(ids)) != len(ids):
        problems.append("sample_ids are not unique")
    if layout.LABELS in readable:
        labels = backend.read(layout.LABELS)
        if len(labels) and (labels.min() < -1 or labels.max() >= c):
            problems.append(f"labels outside [-1, {c})")
    step = int(attrs.get("shard_rows") or 4096)
    shards_read = 0
    for name in (layout.LOGITS, layout.MEMBER_LOGITS):
        if name not in readable:
            continue
        for rows in layout.shard_ranges(n, step):
            shards_read += 1
            try:
                stored = backend.read(name, layout.block_index(name, rows))
            except Exception as e:  # a damaged shard raises whatever its codec raises
                why = one_line(e, limit=120)
                problems.append(f"{name}: rows {rows.start}-{rows.stop - 1} unreadable ({why})")
                continue
            if ids is not None and (bad := nonfinite_ids(decode(stored, cache.dtype), ids[rows])):
                problems.append(f"{name}: NaN/Inf for sample ids {bad}")
    summary = {
        "path": str(cache.path),
        "format": cache.format,
        "num_samples": n,
        "num_members": m,
        "shards_read": shards_read,
        "fingerprint": cache.fingerprint,
    }
    return problems, summary
