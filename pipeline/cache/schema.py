"""The nodes a cache may hold, as one table (the design's "The cache").

The writer, reader, verify, convert-cache and inspect iterate this table instead of naming
arrays, so adding a node is a row here (`register_node`) plus the code that produces its values
(given to `CacheWriter`) and the code that consumes them (`TeacherCache.read`).

A node's shape is a tuple of dimension names. "N" is the row axis: chunks and shards split only
that axis, and every node has it. N, V, C and M are sized by the attributes num_samples,
num_views, num_classes and num_members; any other dimension by the `dims` attribute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cache import layout
from pipeline.cache.codec import decode, encode

LOGITS = "logits"  # (N, V, C) raw teacher logits, T = 1
MEMBER_LOGITS = "members/logits"  # (M, N, V, C)
SAMPLE_IDS = "sample_ids"  # (N,) int64
LABELS = "labels"  # (N,) int64, -1 unknown
VIEW_SEEDS = "views/seed"  # (N, V) int64, only in caches of augmented views

ROWS = "N"  # the row axis: one row per sample
# Dimensions every cache sizes in its own attribute; any other lives in the `dims` attribute.
SIZE_ATTRS = {"N": "num_samples", "V": "num_views", "C": "num_classes", "M": "num_members"}
LOGITS_DTYPE = "logits"  # a node stored in the cache's logits dtype (float32/float16/bfloat16)
WRITTEN = ("create", "shard")  # given whole to the writer's constructor, or shard by shard


@dataclass(frozen=True)
class Block:
    """What a node check knows besides the values: whose rows they are and the cache sizes."""

    ids: np.ndarray  # (S,) sample ids of the rows checked
    axis: int  # where those rows lie in the values
    sizes: Mapping[str, int]  # dimension name -> size, e.g. {"N": 360, "C": 10, ...}
    dtype: str  # the cache's logits dtype


# A node check: decoded values of some rows -> problems, each one line without the node name.
Check = Callable[[np.ndarray, Block], list[str]]


@dataclass(frozen=True)
class Node:
    """One array a cache may hold.

    dims:     dimension names; "N" (rows) is required, e.g. ("M", "N", "V", "C").
    dtype:    "logits" for the cache's logits dtype (encoded by `codec`), else a numpy dtype.
    required: in every cache. Otherwise present when `when` names a dimension whose size is
              > 0 (members/logits: M), or else when the writer is asked for it (`nodes=`).
    written:  "create" (whole array given to the writer's constructor) or "shard".
    check:    problems in decoded values, shared by the writer (refuses) and verify (reports).
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    required: bool = False
    written: str = "shard"
    check: Check | None = None
    doc: str = ""
    when: str = ""

    def __post_init__(self) -> None:
        if self.dims.count(ROWS) != 1:
            raise ValueError(f"node {self.name}: dims {self.dims} must hold {ROWS!r} exactly once")
        if self.written not in WRITTEN:
            raise ValueError(f"node {self.name}: written {self.written!r}, expected {WRITTEN}")
        if self.dtype != LOGITS_DTYPE:
            np.dtype(self.dtype)  # a typo fails here, not at the first write

    @property
    def axis(self) -> int:
        """The row axis: chunks and shards split only this one."""
        return self.dims.index(ROWS)

    def present(self, sizes: Mapping[str, int], asked: Iterable[str] = ()) -> bool:
        """Whether a cache of these sizes, written with extra nodes `asked`, holds this node."""
        if self.required:
            return True
        if self.when:
            return sizes.get(self.when, 0) > 0
        return self.name in asked

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(sizes[d]) for d in self.dims)

    def stored_dtype(self, logits_dtype: str) -> np.dtype:
        if self.dtype == LOGITS_DTYPE:
            return layout.stored_dtype(logits_dtype)
        return np.dtype(self.dtype)

    def num_rows(self, values: np.ndarray) -> int:
        return values.shape[self.axis]

    def checked_values(self, given: np.ndarray) -> np.ndarray:
        """Values given to the writer as the check sees them: logits-dtype nodes as float32
        before rounding (so float16 overflow is told from NaN), others in their own dtype."""
        if self.dtype == LOGITS_DTYPE:
            return np.asarray(given, np.float32)
        given = np.asarray(given)
        values = given.astype(self.dtype, copy=False)
        # Whole floats are fine as integers (labels 3.0); a fraction is a mistake, not a label.
        if values.dtype.kind in "iub" and given.dtype.kind == "f":
            if not np.array_equal(values, given):
                raise ValueError(f"{self.name}: {given.dtype} values that are not {self.dtype}")
        return values

    def encode(self, values: np.ndarray, logits_dtype: str) -> np.ndarray:
        """Decoded values -> the words stored on disk."""
        if self.dtype == LOGITS_DTYPE:
            return encode(values, logits_dtype)
        return np.asarray(values).astype(self.dtype, copy=False)

    def decode(self, stored: np.ndarray, logits_dtype: str) -> np.ndarray:
        """Stored words -> values (logits-dtype nodes as float32)."""
        if self.dtype == LOGITS_DTYPE:
            return decode(stored, logits_dtype)
        return stored

    def index(self, rows: slice) -> tuple[slice, ...]:
        """Index of `rows` along the row axis (and everything else)."""
        return layout.block_index(self.axis, rows)

    def problems(
        self, values: np.ndarray, ids: np.ndarray, sizes: Mapping[str, int], dtype: str
    ) -> list[str]:
        """This node's check on decoded `values` of the rows with sample ids `ids`."""
        if self.check is None:
            return []
        return self.check(values, Block(ids, self.axis, sizes, dtype))


def nonfinite_ids(values: np.ndarray, ids: np.ndarray, axis: int = 0) -> list[int]:
    """The first (up to 5) of `ids` (S,) whose rows of `values` (S along `axis`) hold NaN/Inf."""
    finite = np.isfinite(values)
    if finite.all():
        return []
    bad = ~finite.all(axis=tuple(a for a in range(values.ndim) if a != axis))
    return ids[bad][:5].tolist()


def check_finite(values: np.ndarray, block: Block) -> list[str]:
    """Logits: no NaN/Inf, and in a float16 cache none beyond float16's range."""
    if bad := nonfinite_ids(values, block.ids, block.axis):
        return [f"NaN/Inf for sample ids {bad}"]
    if block.dtype == "float16":
        # Values that round to Inf in float16; at verify time decoded float16 never does.
        if bad := nonfinite_ids(encode(values, "float16"), block.ids, block.axis):
            return [
                f"sample ids {bad} overflow float16 (|x| > 65504); use --dtype float32 or bfloat16"
            ]
    return []


def check_unique(values: np.ndarray, block: Block) -> list[str]:
    """Sample ids: each one names a single row (they are the join key)."""
    uniq, counts = np.unique(values, return_counts=True)
    repeated = uniq[counts > 1]
    if len(repeated):
        return [f"not unique ({len(repeated)} ids repeated, e.g. {repeated[0]})"]
    return []


def check_labels(values: np.ndarray, block: Block) -> list[str]:
    """Labels: a class index in [0, C), or -1 where unknown."""
    c = block.sizes["C"]
    bad = np.flatnonzero((values < -1) | (values >= c))
    if not len(bad):
        return []
    first = bad[0]
    more = f" ({len(bad)} labels outside)" if len(bad) > 1 else ""
    return [
        f"label {values[first]} of sample id {block.ids[first]} is outside [-1, {c}): "
        f"the cache has {c} classes{more}"
    ]


# The table, in the order nodes are created, written, checked and listed.
_TABLE: dict[str, Node] = {}


def register_node(node: Node) -> Node:
    """Add `node` to the table (after the nodes already there)."""
    if node.name in _TABLE:
        raise ValueError(f"cache node {node.name!r} is already in the table")
    _TABLE[node.name] = node
    return node


def unregister_node(name: str) -> None:
    """Remove node `name` from the table."""
    if _TABLE.pop(name, None) is None:
        raise ValueError(f"cache node {name!r} is not in the table")


@contextlib.contextmanager
def registered(node: Node) -> Iterator[Node]:
    """`node` in the table for the duration of a `with` block (tests, plugins)."""
    register_node(node)
    try:
        yield node
    finally:
        unregister_node(node.name)


def nodes() -> tuple[Node, ...]:
    """Every node of the table, in order."""
    return tuple(_TABLE.values())


def get(name: str) -> Node:
    """The table's node `name`."""
    if name not in _TABLE:
        raise ValueError(f"{name!r} is not a cache node (known: {', '.join(_TABLE)})")
    return _TABLE[name]


def sizes(attrs: Mapping[str, Any]) -> dict[str, int]:
    """Dimension name -> size, from a cache's attributes (num_members absent: 0)."""
    out = {d: int(attrs[a]) for d, a in SIZE_ATTRS.items() if a in attrs}
    out.setdefault("M", 0)
    out.update({d: int(n) for d, n in (attrs.get("dims") or {}).items()})
    return out


# The nodes of every kd-pipeline cache, in table order.
for _node in (
    Node(
        LOGITS,
        ("N", "V", "C"),
        LOGITS_DTYPE,
        required=True,
        check=check_finite,
        doc="combined teacher logits, raw (T = 1)",
    ),
    Node(
        MEMBER_LOGITS,
        ("M", "N", "V", "C"),
        LOGITS_DTYPE,
        when="M",
        check=check_finite,
        doc="per-member raw logits (--keep-members)",
    ),
    Node(
        SAMPLE_IDS,
        ("N",),
        "int64",
        required=True,
        written="create",
        check=check_unique,
        doc="stable id of each sample: the join key, never the row",
    ),
    Node(
        LABELS,
        ("N",),
        "int64",
        required=True,
        written="create",
        check=check_labels,
        doc="ground truth where known, -1 where not",
    ),
    # Written shard by shard beside the logits of the views it seeds; asked for by precompute
    # (`nodes=`) only with an augmentation, so an unaugmented cache is as before.
    Node(
        VIEW_SEEDS,
        ("N", "V"),
        "int64",
        doc="seed of each augmented view; view (i, v) is regenerated from it alone "
        "(pipeline.views.apply_views)",
    ),
):
    register_node(_node)
