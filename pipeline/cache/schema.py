"""The nodes a cache may hold, as one table (the design's "The cache").

The writer, reader, verify, convert-cache and inspect iterate this table instead of naming
arrays, so adding a node is a row here (`register_node`) plus the code that produces its values
(given to `CacheWriter`) and the code that consumes them (`TeacherCache.read`).

A node's shape is a tuple of dimension names. "N" is the row axis: chunks and shards split only
that axis, and every node has it. N, V, C and M are sized by the attributes num_samples,
num_views, num_classes and num_members; any other dimension by the `dims` attribute.

Some nodes are named by the user, so no fixed row can hold them: a *family* (`register_family`)
derives them from a cache's own attributes. The sparse targets are families too (`topk/` and
`sample/`, declared by the attributes `targets` and `topk` / `sample`; their last axis K or W
sized in `dims`, and with either `logits` is absent). The first family is the feature targets,
`features/<name>` (N, V, ...): the attribute `features` says what each one is (kind, layers,
params, per-sample shape, dtype) and `dims` sizes its trailing dimensions `<name>.0`, `<name>.1`,
... Pass a cache's attributes to `nodes(attrs)` and `get(name, attrs)` and its family nodes come
with the table's; the writer, reader, verify and convert-cache all do, so a family node is
written, read, checked and copied like any other.
"""

from __future__ import annotations

import contextlib
import math
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
FEATURES = "features"  # attribute declaring the feature nodes, and their names' prefix
# Sparse targets (pipeline.cache.sparse): the attribute `targets` says which kind a cache holds
# ("topk" or "sampled"; absent: full logits), and the attribute of that kind (`topk` or
# `sample`) declares its nodes, which take the place of `logits`.
TARGETS = "targets"
TOPK = "topk"  # attribute {"k", "index_dtype"} and the prefix of its nodes
TOPK_VALUES = "topk/values"  # (N, V, K) float32 raw logits, largest first
TOPK_INDICES = "topk/indices"  # (N, V, K) int16 / int32 classes
TOPK_LSE = "topk/lse"  # (N, V) float32 log-sum-exp of all C logits at T = 1
TOPK_NODES = (TOPK_VALUES, TOPK_INDICES, TOPK_LSE)
SAMPLE = "sample"  # attribute {"k", "width", "index_dtype", "count_dtype", "seed", ...}
SAMPLE_INDICES = "sample/indices"  # (N, V, W) distinct drawn classes, then padding
SAMPLE_COUNTS = "sample/counts"  # (N, V, W) uint8 / uint16 draws of each; rows sum to K
SAMPLE_VALUES = "sample/values"  # (N, V, W) float32 raw logits of the drawn classes
TOPK_DIM, SAMPLE_DIM = "topk.k", "sample.width"  # the sparse nodes' last axis, sized in dims
SPARSE_DIMS = (TOPK_DIM, SAMPLE_DIM)

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
    required: in every cache, unless a dimension of `absent_with` has a size > 0 (logits:
              not in a cache of sparse targets). Otherwise present when `when` names a
              dimension whose size is > 0 (members/logits: M), or else when the writer is
              asked for it (`nodes=`).
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
    absent_with: tuple[str, ...] = ()

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
        if any(sizes.get(d, 0) > 0 for d in self.absent_with):
            return False
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
        with np.errstate(over="ignore"):  # float16 overflow becomes Inf, which checks report
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


def check_feature(values: np.ndarray, block: Block) -> list[str]:
    """Features: no NaN/Inf (in their stored dtype, so float16 overflow shows as Inf)."""
    if not (bad := nonfinite_ids(values, block.ids, block.axis)):
        return []
    if values.dtype == np.float16:
        return [
            f"NaN/Inf for sample ids {bad} (float16 holds |x| <= 65504: give the feature "
            ":dtype=float32)"
        ]
    return [f"NaN/Inf for sample ids {bad}"]


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


@dataclass(frozen=True)
class Family:
    """Nodes a cache declares in its own attributes (user-named, so not rows of the table).

    prefix:  their names start with it, e.g. "features/".
    derive:  a cache's attributes -> its nodes of the family, in order.
    leading: the dims every node of the family starts with; the row axis is among them, so a
             backend (which needs only that) can look a node up without the attributes.
    """

    prefix: str
    derive: Callable[[Mapping[str, Any]], list[Node]]
    leading: tuple[str, ...] = ("N", "V")
    doc: str = ""

    def template(self, name: str) -> Node:
        """Node `name` as known without a cache's attributes: right row axis, no trailing dims."""
        return Node(name, self.leading, "float32", required=True, doc=self.doc)


_FAMILIES: dict[str, Family] = {}


def register_node(node: Node) -> Node:
    """Add `node` to the table (after the nodes already there)."""
    if node.name in _TABLE:
        raise ValueError(f"cache node {node.name!r} is already in the table")
    if family := _family_of(node.name):
        raise ValueError(f"cache node {node.name!r} lies in the family {family.prefix!r}")
    _TABLE[node.name] = node
    return node


def unregister_node(name: str) -> None:
    """Remove node `name` from the table."""
    if _TABLE.pop(name, None) is None:
        raise ValueError(f"cache node {name!r} is not in the table")


def register_family(family: Family) -> Family:
    """Add a family of per-cache nodes (listed after the table's nodes)."""
    clash = [p for p in _FAMILIES if p.startswith(family.prefix) or family.prefix.startswith(p)]
    if clash or any(name.startswith(family.prefix) for name in _TABLE):
        raise ValueError(f"node family {family.prefix!r} overlaps {clash or 'the table'}")
    _FAMILIES[family.prefix] = family
    return family


@contextlib.contextmanager
def registered(node: Node) -> Iterator[Node]:
    """`node` in the table for the duration of a `with` block (tests, plugins)."""
    register_node(node)
    try:
        yield node
    finally:
        unregister_node(node.name)


def _family_of(name: str) -> Family | None:
    return next((f for p, f in _FAMILIES.items() if name.startswith(p)), None)


def declared(attrs: Mapping[str, Any]) -> tuple[Node, ...]:
    """The family nodes a cache with attributes `attrs` declares, in order."""
    return tuple(node for family in _FAMILIES.values() for node in family.derive(attrs))


def nodes(attrs: Mapping[str, Any] | None = None) -> tuple[Node, ...]:
    """Every node of the table, in order; with a cache's attributes, then the nodes it
    declares (`declared`)."""
    return tuple(_TABLE.values()) + (declared(attrs) if attrs is not None else ())


def get(name: str, attrs: Mapping[str, Any] | None = None) -> Node:
    """The node `name`: the table's, else one a cache with attributes `attrs` declares (without
    them, a family node's template: its row axis is right, nothing after it)."""
    if name in _TABLE:
        return _TABLE[name]
    family = _family_of(name)
    if family is not None and attrs is None:
        return family.template(name)
    if family is not None:
        for node in family.derive(attrs):
            if node.name == name:
                return node
    raise ValueError(f"{name!r} is not a cache node (known: {', '.join(_TABLE)})")


def sizes(attrs: Mapping[str, Any]) -> dict[str, int]:
    """Dimension name -> size, from a cache's attributes (num_members absent: 0)."""
    out = {d: int(attrs[a]) for d, a in SIZE_ATTRS.items() if a in attrs}
    out.setdefault("M", 0)
    out.update({d: int(n) for d, n in (attrs.get("dims") or {}).items()})
    return out


def feature_dims(name: str, rank: int) -> tuple[str, ...]:
    """The trailing dimensions of feature `name` with a per-sample shape of `rank` axes, each
    sized in the `dims` attribute: ("att3.0",) for an attention map."""
    return tuple(f"{name}.{i}" for i in range(rank))


def feature_nodes(attrs: Mapping[str, Any]) -> list[Node]:
    """The nodes `features/<name>` (N, V, *shape) the attribute `features` declares, one per
    record {"kind", "layers", "params", "shape", "dtype"} (written by pipeline.teacher.features,
    defined in pipeline.cache.features)."""
    out = []
    for name, record in (attrs.get(FEATURES) or {}).items():
        layers = ",".join(record.get("layers") or [])
        out.append(
            Node(
                f"{FEATURES}/{name}",
                ("N", "V", *feature_dims(name, len(record["shape"]))),
                str(record["dtype"]),
                required=True,
                check=check_feature,
                doc=f"feature target: {record.get('kind')} of {layers}",
            )
        )
    return out


def _ids_where(bad: np.ndarray, block: Block) -> list[int]:
    """The first (up to 5) sample ids whose rows hold a True in `bad` (rows along block.axis)."""
    per_row = bad.any(axis=tuple(a for a in range(bad.ndim) if a != block.axis))
    return block.ids[per_row][:5].tolist()


def check_topk_values(values: np.ndarray, block: Block) -> list[str]:
    """Top-k values (S, V, K): finite raw logits, largest first."""
    if bad := nonfinite_ids(values, block.ids, block.axis):
        return [f"NaN/Inf for sample ids {bad}"]
    if bad := _ids_where(np.diff(values, axis=-1) > 0, block):  # (S, V, K - 1)
        return [f"values not in descending order for sample ids {bad}"]
    return []


def check_class_indices(values: np.ndarray, block: Block) -> list[str]:
    """Class indices (S, V, K): each in [0, C)."""
    c = block.sizes["C"]
    if bad := _ids_where((values < 0) | (values >= c), block):
        return [f"class indices outside [0, {c}) for sample ids {bad}"]
    return []


def counts_check(k: int) -> Check:
    """Sampled counts (S, V, W): each row of every view sums to K (`k`) draws."""

    def check(values: np.ndarray, block: Block) -> list[str]:
        if bad := _ids_where(values.astype(np.int64).sum(-1, keepdims=True) != k, block):
            return [f"counts do not sum to K = {k} for sample ids {bad}"]
        return []

    return check


def topk_nodes(attrs: Mapping[str, Any]) -> list[Node]:
    """The top-k nodes (N, V, K) a cache whose attribute `targets` is "topk" holds; the
    attribute `topk` {"k", "index_dtype"} declares them, `dims` sizes K."""
    record = attrs.get(TOPK) if attrs.get(TARGETS) == TOPK else None
    if not record:
        return []
    return [
        Node(
            TOPK_VALUES,
            ("N", "V", TOPK_DIM),
            "float32",
            True,
            check=check_topk_values,
            doc="top-k raw teacher logits (T = 1), largest first (--topk)",
        ),
        Node(
            TOPK_INDICES,
            ("N", "V", TOPK_DIM),
            str(record["index_dtype"]),
            True,
            check=check_class_indices,
            doc="the classes of topk/values",
        ),
        Node(
            TOPK_LSE,
            ("N", "V"),
            "float32",
            True,
            check=check_feature,
            doc="exact log-sum-exp of all C raw logits (T = 1): the tail mass",
        ),
    ]


def sample_nodes(attrs: Mapping[str, Any]) -> list[Node]:
    """The sampled nodes (N, V, W) a cache whose attribute `targets` is "sampled" holds; the
    attribute `sample` {"k", "width", "index_dtype", "count_dtype", "values", ...} declares
    them, `dims` sizes W."""
    record = attrs.get(SAMPLE) if attrs.get(TARGETS) == "sampled" else None
    if not record:
        return []
    out = [
        Node(
            SAMPLE_INDICES,
            ("N", "V", SAMPLE_DIM),
            str(record["index_dtype"]),
            True,
            check=check_class_indices,
            doc="distinct sampled classes, then padding (--sample-k)",
        ),
        Node(
            SAMPLE_COUNTS,
            ("N", "V", SAMPLE_DIM),
            str(record["count_dtype"]),
            True,
            check=counts_check(int(record["k"])),
            doc="draws of each class of sample/indices",
        ),
    ]
    if record.get("values"):
        doc = "raw teacher logits of sample/indices (T != proposal T)"
        out.append(
            Node(
                SAMPLE_VALUES, ("N", "V", SAMPLE_DIM), "float32", True, check=check_feature, doc=doc
            )
        )
    return out


# The nodes of every kd-pipeline cache, in table order.
for _node in (
    Node(
        LOGITS,
        ("N", "V", "C"),
        LOGITS_DTYPE,
        required=True,
        check=check_finite,
        doc="combined teacher logits, raw (T = 1); not stored with sparse targets",
        absent_with=SPARSE_DIMS,
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
        "(pipeline.data.views.apply_views)",
    ),
):
    register_node(_node)

register_family(
    Family(
        f"{FEATURES}/",
        feature_nodes,
        doc="intermediate teacher targets per view: attention maps, hints, FSP matrices, "
        "input gradients (pipeline.teacher.features)",
    )
)

register_family(
    Family(f"{TOPK}/", topk_nodes, doc="sparse targets: top-k logits and log-sum-exp (--topk)")
)
register_family(
    Family(f"{SAMPLE}/", sample_nodes, doc="sparse targets: sampled classes (--sample-k)")
)


def plan_nodes(
    base: dict[str, int],
    asked: tuple[str, ...],
    dims: dict[str, int],
    attrs: Mapping[str, Any] | None = None,
) -> tuple[tuple[Node, ...], dict[str, int]]:
    """The nodes a cache of sizes `base` (N, V, C, M) with extra nodes `asked` and declared
    attributes `attrs` (schema families) holds, and the sizes of the extra dimensions they use
    (from `dims`): what `CacheWriter` writes, known before anything is."""
    for name in asked:
        node = get(name)
        if node.required or node.when:
            raise ValueError(f"node {name} is not an optional node to ask for")
    if clash := sorted(set(dims) & set(SIZE_ATTRS)):
        raise ValueError(f"dims {clash} are sized by their own arguments, not by dims=")
    sized = {**base, **dims}  # the sparse dims (K, W) take `logits` out
    chosen = tuple(node for node in nodes(attrs or {}) if node.present(sized, asked))
    used = {d for node in chosen for d in node.dims if d not in SIZE_ATTRS}
    if missing := sorted(used - set(dims)):
        raise ValueError(f"no size for dimension(s) {missing}: give dims={{name: size}}")
    return chosen, {d: int(dims[d]) for d in sorted(used)}


def projected(
    num_samples: int,
    *,
    num_classes: int,
    num_views: int = 1,
    num_members: int = 0,
    nodes: Iterable[str] = (),
    dims: Mapping[str, int] | None = None,
    attrs: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> list[tuple[Node, tuple[int, ...], int]]:
    """Each node a `CacheWriter` given these arguments writes, with its shape and its stored
    bytes before compression: the size of a cache, known before the run."""
    base = {"N": num_samples, "V": num_views, "C": num_classes, "M": num_members}
    chosen, dims = plan_nodes(base, tuple(nodes), dict(dims or {}), attrs)
    sizes = {**base, **dims}
    return [(n, n.shape(sizes), row_bytes(n, sizes, dtype) * num_samples) for n in chosen]


def row_bytes(node: Node, sizes: dict[str, int], logits_dtype: str) -> int:
    """Stored (uncompressed) bytes of one row (one sample) of `node`, every member and view."""
    shape = node.shape(sizes)
    per_row = math.prod(shape[: node.axis] + shape[node.axis + 1 :])
    return per_row * node.stored_dtype(logits_dtype).itemsize
