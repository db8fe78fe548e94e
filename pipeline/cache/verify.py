"""Checking a cache end to end: storage, attributes, shapes, values (`pipeline verify`).

Every node of the table (`schema`) the cache should hold is checked the same way: present, of
the shape its dims and the attributes give and of its stored dtype, with a checksum on its
chunks (format version 2), every shard read through the same guarded read as training (a
missing shard file or chunk, a checksum mismatch or an undecodable chunk is a problem naming
its rows, and reading goes on with the next shard), the node's own check on the decoded values,
and the sha256 of every shard as stored against the digest recorded when the cache was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout, schema
from pipeline.cache.backends import Backend, DamagedData
from pipeline.cache.copy import DIGESTS_OF
from pipeline.cache.layout import shard_ranges
from pipeline.cache.reader import TeacherCache
from pipeline.cache.schema import MEMBER_LOGITS, SAMPLE_IDS, Node
from pipeline.core.errors import PipelineError

# No time of creation: the same inputs must give the same bytes (it is in the run record).
PROVENANCE = ("class_names", "teacher", "data", "params", "created_with")
SIZES = ("num_samples", "num_views", "num_classes", "logits_dtype")
NO_CHECKSUMS = (
    "format version 1: chunks carry no checksums and shards no digests, so damage inside a "
    "chunk can go unnoticed (precompute again, or convert-cache, to get them)"
)


def check_cache(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Every problem found in the cache at `path`, and a summary of what was checked.

    Problems: incomplete; missing attributes; node shapes or stored dtypes that disagree with
    the attributes; chunks without checksums in a version-2 cache; a shard file (Zarr) or chunk
    (HDF5) missing, failing its checksum or undecodable (every such range); values a node's
    check refuses (NaN/Inf in the logits, duplicate sample ids, labels outside [-1, C), ...);
    a shard whose stored bytes differ from the digest recorded at finish. The summary's
    `notes` say what was not checked (a version-1 cache has no checksums).
    """
    with TeacherCache(path, check_attrs=False) as cache:
        return _check(cache)


def _check(cache: TeacherCache) -> tuple[list[str], dict[str, Any]]:
    problems = _check_attributes(cache)
    if any(k not in cache.attrs for k in SIZES):
        return problems, {}  # nothing to size the nodes by
    sizes, more = _sizes(cache)
    problems += more
    expected, more = _expected_nodes(cache, sizes)
    problems += more
    readable = []
    for node in expected:
        more = _check_storage(cache, node, node.shape(sizes))
        problems += more
        if not more:
            readable.append(node)
    more, shards_read, damaged = _check_values(cache, readable, sizes)
    problems += more
    more, digests_checked = _check_digests(cache, readable, damaged)
    problems += more
    summary = {
        "path": str(cache.path),
        "format": cache.format,
        "format_version": cache.format_version,
        "checksums": cache.checksums,
        "num_samples": sizes["N"],
        "num_members": sizes["M"],
        "shards_read": shards_read,  # (node, shard) pairs
        "num_shards": layout.num_shards(sizes["N"], _shard_rows(cache)),
        "digests_checked": digests_checked,
        "fingerprint": cache.fingerprint,
        "fingerprint_scheme": cache.fingerprint_scheme,
        "notes": [] if cache.checksums else [NO_CHECKSUMS],
    }
    return problems, summary


def _check_attributes(cache: TeacherCache) -> list[str]:
    """Completeness, and the attributes every (complete) cache has."""
    problems, attrs = [], cache.attrs
    try:
        cache.check_attrs()
    except PipelineError as e:
        problems.append(str(e).split(" is damaged: ", 1)[-1])
    if not cache.complete:
        problems.append("not complete (its precompute run did not finish)")
    if missing := [k for k in SIZES if k not in attrs]:
        problems.append(f"attributes missing: {', '.join(missing)}")
        return problems
    if cache.complete:
        wanted = (*PROVENANCE, "compression", "chunk_rows", "shard_rows")
        if cache.checksums:
            wanted += (layout.DIGESTS,)
        if gone := [k for k in wanted if k not in attrs]:
            problems.append(f"attributes missing: {', '.join(gone)}")
    return problems


def _sizes(cache: TeacherCache) -> tuple[dict[str, int], list[str]]:
    """Dimension sizes (M: the members stored), and where the attributes disagree on them."""
    problems, attrs = [], cache.attrs
    sizes = {**cache.sizes, "M": cache.num_members}
    m, c = sizes["M"], sizes["C"]
    if attrs.get("num_members", m) != m:
        problems.append(f"attribute num_members is {attrs['num_members']}, members/logits has {m}")
    members = (attrs.get("teacher") or {}).get("members") or []
    if m and members and len(members) != m:
        problems.append(f"{MEMBER_LOGITS} has {m} members, attribute teacher {len(members)}")
    names = attrs.get("class_names")
    if names is not None and len(names) != c:
        problems.append(f"class_names has {len(names)} names for {c} classes")
    return sizes, problems


def _expected_nodes(cache: TeacherCache, sizes: dict[str, int]) -> tuple[list[Node], list[str]]:
    """The nodes this cache should hold: those its sizes imply, those its `nodes` attribute
    lists, and any other node of the table it holds."""
    problems = []
    asked = list(cache.attrs.get("nodes") or [])
    try:
        table = schema.nodes(cache.attrs)  # with the nodes it declares (features)
    except (KeyError, TypeError, ValueError) as e:
        table = schema.nodes()
        problems.append(f"attribute {schema.FEATURES} damaged ({e!r})")
    if unknown := [name for name in asked if name not in {node.name for node in table}]:
        problems.append(f"attribute nodes lists {unknown}, which this version does not know")
    expected = []
    for node in table:
        if not (node.present(sizes, asked) or cache.backend.has(node.name)):
            continue
        if missing := [d for d in node.dims if d not in sizes]:
            problems.append(f"{node.name}: attribute dims has no size for {', '.join(missing)}")
            continue
        expected.append(node)
    return expected, problems


def _check_storage(cache: TeacherCache, node: Node, shape: tuple[int, ...]) -> list[str]:
    """Node `node` exists with `shape` and its stored dtype, with checksums where the format
    version promises them. (Missing shards are found by reading: `_check_values`.)"""
    backend, name, word = cache.backend, node.name, node.stored_dtype(cache.dtype)
    if not backend.has(name):
        return [f"{name}: array missing"]
    got_shape, got_word = backend.shape(name), backend.dtype(name)
    if got_shape != shape or got_word != word:
        return [f"{name}: {got_shape} {got_word}, attributes say {shape} {word}"]
    if cache.checksums and not backend.checksummed(name):
        return [f"{name}: chunks carry no checksum, yet format_version is {cache.format_version}"]
    return []


def _check_values(
    cache: TeacherCache, nodes: list[Node], sizes: dict[str, int]
) -> tuple[list[str], int, set[tuple[str, int]]]:
    """Read every node a shard at a time and run its check: per shard for "shard" nodes, on
    the whole array for "create" nodes (once every shard of it read). Returns the problems, the
    number of shards read and the (node, shard) pairs that could not be read."""
    shard_rows = _shard_rows(cache)
    damaged: list[DamagedData] = []
    ids = None  # (N,) sample ids, to name rows in problems; unreadable ids skip the checks
    ordered = sorted(nodes, key=lambda node: node.name != SAMPLE_IDS)  # ids first
    problems, shards_read = [], 0
    for node in ordered:
        pieces = []
        for rows in shard_ranges(sizes["N"], shard_rows):
            shards_read += node.written == "shard"
            try:
                values = cache.read(node.name, rows)
            except DamagedData as e:
                damaged.append(e)
                continue
            if node.written == "shard" and ids is not None:
                found = node.problems(values, ids[rows], sizes, cache.dtype)
                problems += [f"{node.name}: {p}" for p in found]
            pieces.append(values)
        if node.written == "create" and len(pieces) == layout.num_shards(sizes["N"], shard_rows):
            whole = np.concatenate(pieces, axis=node.axis) if pieces else None
            ids = whole if node.name == SAMPLE_IDS else ids
            if whole is not None and ids is not None:
                found = node.problems(whole, ids, sizes, cache.dtype)
                problems += [f"{node.name}: {p}" for p in found]
    units = {(e.node, e.start // shard_rows) for e in damaged}
    return _damage_lines(damaged) + problems, shards_read, units


def _shard_rows(cache: TeacherCache) -> int:
    return int(cache.attrs.get("shard_rows") or layout.SHARD_TARGET_ROWS)


def _damage_lines(damaged: list[DamagedData]) -> list[str]:
    """One problem per damaged range of a node; adjacent ranges damaged the same way merge
    (a cache missing 100 shards in a row is one line, not 100)."""
    merged: list[list[Any]] = []  # [node, start, stop, reason]
    for e in damaged:
        last = merged[-1] if merged else None
        if last and (last[0], last[2], last[3]) == (e.node, e.start, e.reason):
            last[2] = e.stop
        else:
            merged.append([e.node, e.start, e.stop, e.reason])
    return [f"{node}: rows {start}-{stop - 1} {reason}" for node, start, stop, reason in merged]


def _check_digests(
    cache: TeacherCache, nodes: list[Node], damaged: set[tuple[str, int]]
) -> tuple[list[str], int]:
    """Recompute the sha256 of every shard as stored and compare it with the digest recorded
    at finish; shards already reported damaged are skipped. Returns problems and the number
    of digests compared."""
    recorded = cache.attrs.get(layout.DIGESTS)
    if not cache.checksums or not isinstance(recorded, dict):
        return [], 0  # version 1 has none; a v2 cache without them is an attribute problem
    backend: Backend = cache.backend
    shard_rows = _shard_rows(cache)
    if int(recorded.get("shard_rows") or 0) != shard_rows:
        return [f"attribute {layout.DIGESTS} is for shards of {recorded.get('shard_rows')} rows"], 0
    if recorded.get("of") != DIGESTS_OF[backend.name]:
        # e.g. attributes copied from a cache in the other format by hand
        return [f"attribute {layout.DIGESTS} digests {recorded.get('of')!r}, not this format's"], 0
    problems, checked = [], 0
    for node in nodes:
        want = (recorded.get("nodes") or {}).get(node.name)
        if want is None:
            problems.append(f"{node.name}: no digest recorded in attribute {layout.DIGESTS}")
            continue
        have = backend.shard_digests(node.name, shard_rows)
        bad = []
        for k, (a, b) in enumerate(zip(have, list(want) + [None] * len(have), strict=False)):
            if (node.name, k) in damaged:
                continue
            checked += 1
            if a != b:
                bad.append(k)
        problems += _digest_lines(node.name, bad, shard_rows, cache.num_samples)
    return problems, checked


def _digest_lines(name: str, bad: list[int], shard_rows: int, n: int) -> list[str]:
    lines = []
    for k in bad:
        start, stop = k * shard_rows, min((k + 1) * shard_rows, n)
        lines.append(
            f"{name}: rows {start}-{stop - 1} differ from what was written (sha256 of the "
            "stored shard does not match the digest recorded at finish)"
        )
    return lines
