"""Checking a cache end to end: storage, attributes, shapes, values (`pipeline verify`).

Every node of the table (`schema`) the cache should hold is checked the same way: present, of
the shape its dims and the attributes give and of its stored dtype, no shard file (Zarr) or
chunk (HDF5) missing, every block readable, and the node's own check on the decoded values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import schema
from pipeline.cache.backends import Backend
from pipeline.cache.layout import shard_ranges
from pipeline.cache.reader import TeacherCache
from pipeline.cache.schema import MEMBER_LOGITS, SAMPLE_IDS, Node
from pipeline.errors import one_line

PROVENANCE = ("class_names", "teacher", "data", "params", "created_with", "created_at")
SIZES = ("num_samples", "num_views", "num_classes", "logits_dtype")


def check_cache(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Every problem found in the cache at `path`, and a summary of what was checked.

    Problems: incomplete; missing attributes; node shapes or stored dtypes that disagree with
    the attributes; a shard file (Zarr) or chunk (HDF5) missing or unreadable; values a node's
    check refuses (NaN/Inf in the logits, duplicate sample ids, labels outside [-1, C), ...).
    """
    with TeacherCache(path) as cache:
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
        more = _check_storage(cache.backend, node, node.shape(sizes), cache.dtype)
        problems += more
        if not more:
            readable.append(node)
    more, shards_read = _check_values(cache, readable, sizes)
    problems += more
    summary = {
        "path": str(cache.path),
        "format": cache.format,
        "num_samples": sizes["N"],
        "num_members": sizes["M"],
        "shards_read": shards_read,
        "fingerprint": cache.fingerprint,
    }
    return problems, summary


def _check_attributes(cache: TeacherCache) -> list[str]:
    """Completeness, and the attributes every (complete) cache has."""
    problems, attrs = [], cache.attrs
    if not cache.complete:
        problems.append("not complete (its precompute run did not finish)")
    if missing := [k for k in SIZES if k not in attrs]:
        problems.append(f"attributes missing: {', '.join(missing)}")
        return problems
    if cache.complete:
        gone = [
            k for k in (*PROVENANCE, "compression", "chunk_rows", "shard_rows") if k not in attrs
        ]
        if gone:
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
    known = {node.name for node in schema.nodes()}
    if unknown := [name for name in asked if name not in known]:
        problems.append(f"attribute nodes lists {unknown}, which this version does not know")
    expected = []
    for node in schema.nodes():
        if not (node.present(sizes, asked) or cache.backend.has(node.name)):
            continue
        if missing := [d for d in node.dims if d not in sizes]:
            problems.append(f"{node.name}: attribute dims has no size for {', '.join(missing)}")
            continue
        expected.append(node)
    return expected, problems


def _check_storage(backend: Backend, node: Node, shape: tuple[int, ...], dtype: str) -> list[str]:
    """Node `node` exists with `shape` and its stored dtype, and no block of it is missing."""
    name, word = node.name, node.stored_dtype(dtype)
    if not backend.has(name):
        return [f"{name}: array missing"]
    got_shape, got_word = backend.shape(name), backend.dtype(name)
    if got_shape != shape or got_word != word:
        return [f"{name}: {got_shape} {got_word}, attributes say {shape} {word}"]
    lost = backend.missing_blocks(name)
    problems = [f"{name}: rows {a}-{b - 1} missing (no stored shard/chunk)" for a, b in lost[:3]]
    if len(lost) > 3:
        problems.append(f"{name}: {len(lost) - 3} more missing shards")
    return problems


def _check_values(
    cache: TeacherCache, nodes: list[Node], sizes: dict[str, int]
) -> tuple[list[str], int]:
    """Read every node and run its check: "create" nodes whole, "shard" nodes a shard at a
    time. Returns the problems and the number of shards read."""
    problems, shards_read = [], 0
    by_name = {node.name: node for node in nodes}
    ids = None  # (N,) sample ids, to name rows in problems; unreadable ids skip the checks
    if SAMPLE_IDS in by_name:
        ids, problems = _read_checked(cache, by_name[SAMPLE_IDS], slice(None), None, sizes)
    for node in nodes:
        if node.name == SAMPLE_IDS:
            continue
        if node.written == "create":
            problems += _read_checked(cache, node, slice(None), ids, sizes)[1]
            continue
        for rows in shard_ranges(sizes["N"], int(cache.attrs.get("shard_rows") or 4096)):
            shards_read += 1
            problems += _read_checked(cache, node, rows, ids, sizes)[1]
    return problems, shards_read


def _read_checked(
    cache: TeacherCache,
    node: Node,
    rows: slice,
    ids: np.ndarray | None,  # (N,)
    sizes: dict[str, int],
) -> tuple[np.ndarray | None, list[str]]:
    """Node `node`'s decoded values at `rows` and its problems there (unreadable, or what its
    check finds; sample_ids are checked against themselves)."""
    try:
        stored = cache.backend.read(node.name, node.index(rows))
    except Exception as e:  # a damaged shard raises whatever its codec raises
        last = (rows.stop if rows.stop is not None else sizes["N"]) - 1
        why = one_line(e, limit=120)
        return None, [f"{node.name}: rows {rows.start or 0}-{last} unreadable ({why})"]
    values = node.decode(stored, cache.dtype)
    if node.name == SAMPLE_IDS:
        ids = values
    if ids is None:
        return values, []
    found = node.problems(values, ids[rows], sizes, cache.dtype)
    return values, [f"{node.name}: {p}" for p in found]
