"""Opening a teacher cache for reading: checks, the sample-id join, decoded nodes.

Every read goes through the backend's guard: rows whose shard file (Zarr) or chunk (HDF5) is
missing, fail their checksum or do not decode raise `DamagedData` (a PipelineError naming the
cache, the node and the rows), so damaged targets never reach a student.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout, schema, store
from pipeline.cache.backends import Backend, open_backend
from pipeline.cache.codec import decode_torch
from pipeline.cache.schema import LABELS, LOGITS, MEMBER_LOGITS, SAMPLE_IDS, VIEW_SEEDS
from pipeline.cache.tokens import is_token_cache, token_summary
from pipeline.core.errors import PipelineError


class TeacherCache:
    """A cache opened read-only. Arrays are read in whole ranges, never row by row."""

    def __init__(self, path: str | Path, *, check_attrs: bool = True):
        """Open the cache at `path`; `check_attrs` False (verify only) lets attributes that
        fail their digest through, for verify to list beside every other problem."""
        self.path = store.location(path)  # a local Path, or a URL (object storage)
        self._backend = open_backend(self.path, "r")
        self.format = self._backend.name
        self.attrs: dict[str, Any] = self._backend.attrs()
        if self.attrs.get("format") != layout.FORMAT:
            self.close()
            raise PipelineError(f"{self.path}: not a kd-pipeline teacher cache")
        version = self.attrs.get("format_version")
        if version not in layout.READABLE_VERSIONS:
            self.close()
            readable = ", ".join(map(str, layout.READABLE_VERSIONS))
            raise PipelineError(
                f"{self.path}: cache format_version {version}, this tool reads {readable}"
            )
        self._stamp = self._meta_stamp()  # pinned: every read checks the cache is still this one
        if check_attrs:
            try:
                self.check_attrs()
            except PipelineError:
                self.close()
                raise
        digests = self.attrs.get(layout.DIGESTS)
        if self.complete and isinstance(digests, dict) and isinstance(digests.get("seals"), dict):
            self._backend.pin_seals(digests["seals"], int(digests.get("shard_rows") or 1))

    def check_attrs(self) -> None:
        """Refuse attributes that are not the ones written (`layout.check_attrs`)."""
        layout.check_attrs(self.path, self.attrs, self.format_version == 1 and self.checksummed_any)

    @property
    def identity(self) -> str:
        """This cache's identity (`layout.cache_identity`): a student records the one it trained
        from, and a resumed or streaming run refuses any other."""
        return layout.cache_identity(self.attrs)

    def require_identity(self, identity: str, what: str) -> None:
        """Refuse to go on if this is not the cache `identity` names (`what` says who asks)."""
        if self.identity != identity:
            raise PipelineError(
                f"{self.path} is not the cache {what} (identity {identity[:12]}, now "
                f"{self.identity[:12]}): it was replaced, or another cache was given"
            )

    def _meta_stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the file holding the attributes: a replaced or rewritten
        cache changes it. None on object storage (no cheap stat)."""
        if not isinstance(self.path, Path):
            return None
        meta = self.path / "zarr.json" if self.format == "zarr" else self.path
        try:
            st = meta.stat()
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _check_pinned(self) -> None:
        if self._stamp is not None and self._meta_stamp() != self._stamp:
            raise PipelineError(
                f"cache {self.path} changed while it was being read (replaced or rewritten, "
                "e.g. by precompute-logits --overwrite): stopped rather than mix two caches"
            )

    @property
    def checksummed_any(self) -> bool:
        """Whether any stored node's chunks carry checksums (a version-2 marker)."""
        return any(
            self._backend.checksummed(n.name)
            for n in schema.nodes(self.attrs)
            if self._backend.has(n.name)
        )

    @property
    def backend(self) -> Backend:
        """The storage backend underneath (for whole-cache copies and checks)."""
        return self._backend

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def format_version(self) -> int:
        return int(self.attrs["format_version"])

    @property
    def checksums(self) -> bool:
        """Whether the format stores a checksum with every chunk (version 2 on)."""
        return self.format_version >= 2

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def num_views(self) -> int:
        return int(self.attrs["num_views"])

    @property
    def views(self) -> dict[str, Any]:
        """How the views were made, {} when the teachers saw the raw inputs: the canonical
        augment spec, its digest, the global seed and the algorithm. Rebuild them with
        `pipeline.data.views.Views.from_attrs(cache.attrs)`."""
        return dict(self.attrs.get("views") or {})

    @property
    def augment(self) -> str:
        """The canonical augmentation spec of the views ("" for none)."""
        return str(self.views.get("augment", ""))

    @property
    def has_view_seeds(self) -> bool:
        return self._backend.has(VIEW_SEEDS)

    def view_seeds(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Seed of each view of rows `rows`: view (i, v) is `apply_views(x_i, seed[i, v],
        spec)` (pipeline.data.views).  # (n, V) int64"""
        if not self.has_view_seeds:
            raise PipelineError(
                f"{self.path}: cache has no views/seed (its teachers saw the raw inputs; "
                "precompute with --augment for augmented views)"
            )
        return self.read(VIEW_SEEDS, rows)

    @property
    def dtype(self) -> str:
        return str(self.attrs["logits_dtype"])

    @property
    def fingerprint(self) -> str | None:
        return (self.attrs.get("data") or {}).get("fingerprint")

    @property
    def has_members(self) -> bool:
        return self._backend.has(MEMBER_LOGITS)

    @property
    def num_members(self) -> int:
        """Members stored in `members/logits` (0 when only the combined logits are kept)."""
        return self._backend.shape(MEMBER_LOGITS)[0] if self.has_members else 0

    @property
    def sizes(self) -> dict[str, int]:
        """Dimension name -> size, e.g. {"N": 360, "V": 1, "C": 10, "M": 0}."""
        return schema.sizes(self.attrs)

    def nodes(self) -> list[schema.Node]:
        """The nodes this cache holds: the table's, then those it declares (features)."""
        return [node for node in schema.nodes(self.attrs) if self._backend.has(node.name)]

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        """What each feature target is, by name: {"kind", "layers", "params", "shape",
        "dtype", ...} (`pipeline.teacher.features`); {} for a cache without features."""
        return dict(self.attrs.get(schema.FEATURES) or {})

    def feature(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Feature target `name` of rows `rows`, every view.  # (n, V, *shape)"""
        if name not in self.features:
            have = ", ".join(self.features) or "none"
            raise PipelineError(
                f"{self.path}: cache has no feature {name!r} (its features: {have}; precompute "
                "with --features NAME=LAYER:KIND)"
            )
        return self.read(f"{schema.FEATURES}/{name}", rows)

    @property
    def sample_ids(self) -> np.ndarray:  # (N,)
        return self.read(SAMPLE_IDS)

    @property
    def labels(self) -> np.ndarray:  # (N,)
        return self.read(LABELS)

    def read(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Decoded values of node `name` at `rows` (a slice or row numbers along its N axis);
        logits-dtype nodes come as float32."""
        node = schema.get(name, self.attrs)
        if not self._backend.has(name):
            raise PipelineError(f"{self.path}: cache has no {name}")
        values = node.decode(self._read_rows(node, rows), self.dtype)
        self._check_pinned()  # after the read: what was read came from the cache opened
        return values

    def _read_rows(self, node: schema.Node, rows: slice | np.ndarray) -> np.ndarray:
        """Stored words of `node` at `rows` along its N axis, in whole ranges."""
        if node.axis == 0:
            return self._backend.read(node.name, rows)
        if isinstance(rows, slice):
            return self._backend.read(node.name, node.index(rows))
        # Row numbers along an inner axis: read the range that covers them, then pick.
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        block = self._backend.read(node.name, node.index(slice(lo, hi)))
        return np.take(block, rows - lo, axis=node.axis)

    def read_stored(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Raw stored words of array `name` (bfloat16 stays uint16)."""
        return self._backend.read(name, rows)

    @property
    def target_kind(self) -> str:
        """The kind of teacher targets stored: "logits" (full), "topk" or "sampled"
        (`pipeline.cache.sparse`; then `logits` is not stored)."""
        return str(self.attrs.get(schema.TARGETS) or "logits")

    @property
    def topk_k(self) -> int:
        """K of a top-k cache (0 otherwise)."""
        if self.target_kind != "topk":
            return 0
        return int((self.attrs.get(schema.TOPK) or {}).get("k", 0))

    def _require_targets(self, kind: str) -> None:
        if self.target_kind != kind:
            how = {"logits": "without --topk/--sample-k", "topk": "with --topk K"}
            raise PipelineError(
                f"{self.path}: cache holds {self.target_kind} targets, not {kind} (precompute "
                f"{how.get(kind, 'with --sample-k K')} for them)"
            )

    def topk(
        self, rows: slice | np.ndarray = slice(None)
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k targets of rows `rows`, every view: raw logits, largest first (float32), their
        classes, and the log-sum-exp of all C logits.  # (n, V, K), (n, V, K), (n, V)"""
        self._require_targets("topk")
        return tuple(self.read(name, rows) for name in schema.TOPK_NODES)

    def sampled(self, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
        """Sampled targets of rows `rows`, every view: node name -> values, "sample/indices"
        and "sample/counts" (and "sample/values" when stored).  # each (n, V, W)"""
        self._require_targets("sampled")
        return {n.name: self.read(n.name, rows) for n in schema.sample_nodes(self.attrs)}

    def logits(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Combined teacher logits as float32.  # (n, V, C)"""
        self._require_targets("logits")
        return self.read(LOGITS, rows)

    def logits_torch(self, rows: slice | np.ndarray = slice(None)):
        """Combined logits as a torch tensor in the stored dtype (bfloat16 stays bfloat16,
        bit for bit).  # (n, V, C)"""
        return decode_torch(self._backend.read(LOGITS, rows), self.dtype)

    def member_logits(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Per-member logits as float32, rows `rows` of every member.  # (M, n, V, C)"""
        if not self.has_members:
            raise PipelineError(
                f"{self.path}: cache has no members/logits (precompute with --keep-members)"
            )
        return self.read(MEMBER_LOGITS, rows)

    def dense(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The targets of `rows`, every view, one value per class, as float32: the raw logits
        as stored; in a top-k cache rebuilt by `sparse.topk_logits` (the kept logits exact,
        every tail class the log-mean-exp of the tail, so softmax(z / T) is the top-k target at
        any T; exact at every T when K = C); in a sampled cache the planes of
        `sparse.sampled_planes` (counts, and logits with `sample/values`).
        # (n, V, C), or (n, V, P, C) sampled"""
        from pipeline.cache.sparse import sampled_planes, topk_logits  # torch: only here

        c = self.num_classes
        if self.target_kind == "logits":
            return self.logits(rows)
        if self.target_kind == "topk":
            values, indices, lse = self.topk(rows)  # (n, V, K), (n, V, K), (n, V)
            n, v, k = values.shape
            flat = topk_logits(values.reshape(-1, k), indices.reshape(-1, k), lse.reshape(-1), c)
            return flat.numpy().reshape(n, v, c)  # (n, V, C)
        if self.target_kind != "sampled":
            raise PipelineError(
                f"{self.path}: cache holds {self.target_kind} targets, unknown here"
            )
        nodes = self.sampled(rows)  # name -> (n, V, W)
        counts = nodes["sample/counts"]
        n, v, w = counts.shape
        values = nodes.get("sample/values")
        planes = sampled_planes(
            nodes["sample/indices"].reshape(-1, w),
            counts.reshape(-1, w),
            None if values is None else values.reshape(-1, w),
            c,
        )  # (n·V, P, C)
        return planes.reshape(n, v, -1, c)

    def targets(self, ids: np.ndarray | list[int], view: int = 0) -> np.ndarray:
        """The teacher's targets of the samples `ids` (joined by sample id, any order), on
        view `view`: raw logits at T = 1, as float32 (a top-k cache's rebuilt as `dense`
        says); a sampled cache gives its planes.  # (n, C), or (n, P, C) sampled"""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not 0 <= view < self.num_views:
            raise PipelineError(f"{self.path}: view {view} asked; the cache holds {self.num_views}")
        rows = self.rows_for(ids)
        order = np.argsort(rows, kind="stable")  # read in row order, hand back in ids' order
        values = self.dense(rows[order])[:, view]
        out = np.empty_like(values)
        out[order] = values
        return out

    def require_complete(self) -> None:
        """A finished cache whose arrays agree with its attributes (an edited or mixed-up
        zarr.json would otherwise surface as a numpy error deep in a read)."""
        if not self.complete:
            raise PipelineError(
                f"{self.path}: cache is incomplete (its precompute run did not finish); "
                "re-run precompute-logits"
            )
        try:
            sizes = self.sizes
            for node in self.nodes():
                want, got = node.shape(sizes), self._backend.shape(node.name)
                if tuple(want) != tuple(got):
                    raise PipelineError(
                        f"{self.path}: {node.name} is {tuple(got)} but the attributes say "
                        f"{tuple(want)}: the cache's metadata was changed; run pipeline verify"
                    )
        except (KeyError, TypeError, ValueError) as e:
            raise PipelineError(
                f"{self.path}: attributes damaged ({e!r}); run pipeline verify"
            ) from None

    @property
    def fingerprint_scheme(self) -> str:
        """How `fingerprint` was computed (`pipeline.data.Fingerprint`): "rows", or "stream"
        for caches written before it was recorded."""
        return (self.attrs.get("data") or {}).get("fingerprint_scheme", "stream")

    def data_fingerprint(self, ts: Any) -> str:
        """The fingerprint of the transfer set `ts`, computed as this cache's was."""
        return ts.fingerprint(self.fingerprint_scheme)

    def require_fingerprint(self, fingerprint: str, spec: str) -> None:
        if fingerprint != self.fingerprint:
            built = (self.attrs.get("data") or {}).get("spec", "?")
            raise PipelineError(
                f"{self.path}: cache was built from other data ({built}, fingerprint "
                f"{str(self.fingerprint)[:12]}) than --data {spec} (fingerprint {fingerprint[:12]})"
            )

    def rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Row index in the cache of each sample id; a missing id is an error naming it.  # (n,)"""
        cache_ids = self.sample_ids
        order = np.argsort(cache_ids, kind="stable")
        pos = np.searchsorted(cache_ids, ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos] if len(order) else pos
        missing = (cache_ids[rows] != ids) if len(order) else np.ones(len(ids), bool)
        if missing.any():
            first = np.asarray(ids)[missing][:5].tolist()
            raise PipelineError(f"{self.path}: sample ids not in the cache: {first}")
        return rows

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | Path) -> TeacherCache:
    """Open a cache (Zarr directory or HDF5 file), detecting the format."""
    return TeacherCache(path)


def describe(cache: TeacherCache) -> dict[str, Any]:
    """Everything `pipeline inspect` shows about a cache (attributes, nodes, size, shards)."""
    arrays = {}
    for node in cache.nodes():
        word = cache.backend.dtype(node.name)
        shape = cache.backend.shape(node.name)
        per_row = math.prod(shape[: node.axis] + shape[node.axis + 1 :])  # members, views, ...
        arrays[node.name] = {
            "dims": list(node.dims),
            "shape": list(shape),
            "dtype": cache.dtype if node.dtype == schema.LOGITS_DTYPE else str(word),
            "stored_dtype": str(word),
            "bytes_per_sample": per_row * word.itemsize,  # as stored, before compression
        }
    info = {
        "path": str(cache.path),
        "backend": cache.format,
        "size_bytes": store.size(cache.path),
        "arrays": arrays,
        **cache.attrs,
    }
    if "shard_rows" in info and "num_samples" in info:
        info["num_shards"] = layout.num_shards(info["num_samples"], info["shard_rows"])
    if is_token_cache(cache.attrs) and cache.attrs.get("complete"):
        info["token_summary"] = token_summary(cache)
    progress = info.pop(layout.PROGRESS, None)
    if isinstance(progress, dict):  # an unfinished run: say how far it got, not its record
        records = getattr(cache.backend, "read_records", dict)()
        info["shards_done"] = len(records) or len(progress.get("shards_done", []))
    return info


def _checksums_line(info: dict[str, Any]) -> str:
    if (info.get("format_version") or 1) < 2:
        return "none (format version 1: damage inside a chunk can go unnoticed)"
    kind = "crc32c" if info["backend"] == "zarr" else "fletcher32"
    digests = "sha256 of every shard recorded" if layout.DIGESTS in info else "no shard digests"
    return f"{kind} on every chunk, checked on every read; {digests}"


def _views_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The `inspect` row of augmented views (none for a cache of the raw inputs)."""
    views = info.get("views") or {}
    if not views:
        return []
    text = (
        f"{info.get('num_views')} per sample, augment {views.get('augment')} "
        f"(sha256 {views.get('augment_sha256')}), seed {views.get('seed')}"
    )
    return [("views", text)]


def _targets_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The `inspect` row of sparse targets (none for a cache of full logits)."""
    kind = info.get(schema.TARGETS)
    if kind == "topk":
        k = (info.get(schema.TOPK) or {}).get("k")
        return [("targets", f"top-{k} raw logits + log-sum-exp per view (full logits not kept)")]
    if kind == "sampled":
        record = info.get(schema.SAMPLE) or {}
        what = f"{record.get('k')} classes drawn per view at T = 1, seed {record.get('seed')}"
        return [("targets", f"sampled: {what} (full logits not kept)")]
    return []


def _tokens_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The `inspect` rows of a token cache: what its rows are, what its top-k keep."""
    t = info.get("token_summary")
    if not t:
        return []
    what = f"{t['tokens']} distilled tokens ({t['distil']}) of {t['sequences']} sequences"
    vocab, head = info.get("num_classes"), t.get("teacher_head")
    padding = f" (the teacher's head of {head} cut: padding)" if head and head != vocab else ""
    rows = [("tokens", f"{what}, vocabulary {vocab}{padding}")]
    if t.get("tokenizer"):
        rows.append(("tokenizer", t["tokenizer"]))
    if t.get("kept_mass_mean") is not None:
        k = (info.get(schema.TOPK) or {}).get("k")
        kept = (
            f"top-{k} keep {t['kept_mass_mean']:.2%} of the probability on average (T = 1); "
            f"10% of tokens keep less than {t['kept_mass_p10']:.2%}"
        )
        rows.append(("kept mass", kept))
    return rows


def _features_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """One `inspect` row per feature target: what it is, from the `features` attribute."""
    rows = []
    for name, f in (info.get(schema.FEATURES) or {}).items():
        params = ", ".join(f"{k}={v}" for k, v in (f.get("params") or {}).items())
        what = f"{f.get('kind')} of {', '.join(f.get('layers') or [])}"
        rows.append((f"feature {name}", f"{what}" + (f" ({params})" if params else "")))
    return rows


def _node_row(name: str, a: dict[str, Any]) -> tuple[str, str]:
    """e.g. ("logits", "(360, 1, 10) float16, 20 B/sample")."""
    text = f"{tuple(a['shape'])} {a.get('dtype', '')}".rstrip()
    if "bytes_per_sample" in a:
        text += f", {layout.format_size(a['bytes_per_sample'])}/sample"
    return name, text


def describe_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """`describe`'s dict as (label, text) rows for `pipeline inspect`: all the provenance."""
    arrays = info["arrays"]
    teacher = info.get("teacher") or {}
    data = info.get("data") or {}
    complete = str(info.get("complete"))
    if "shards_done" in info:
        complete += f" ({info['shards_done']} of {info.get('num_shards', '?')} shards done)"
    rows = [
        ("path", info["path"]),
        ("format", f"{info['backend']} ({info.get('format')} v{info.get('format_version')})"),
        ("complete", complete),
        ("checksums", _checksums_line(info)),
    ]
    # One line per node, e.g. "logits  (360, 1, 10) float16, 20 B/sample" (as stored,
    # before compression).
    rows += [_node_row(name, a) for name, a in arrays.items()]
    rows += [
        (
            "samples / views / classes",
            f"{info.get('num_samples')} / {info.get('num_views')} / {info.get('num_classes')}",
        ),
        ("class names", ", ".join(map(str, info.get("class_names") or [])) or "-"),
        (
            "storage",
            f"{info.get('compression')}, chunks of {info.get('chunk_rows')} rows, shards of "
            f"{info.get('shard_rows')} rows ({info.get('num_shards', '?')} shards)",
        ),
    ]
    for i, m in enumerate(teacher.get("members", []), 1):
        rows.append(
            (f"teacher {i}", f"{m.get('name')} ({m.get('kind', 'checkpoint')} {m['source']})")
        )
        rows.append(("  sha256", m.get("sha256") or "-"))
        if m.get("num_params"):
            rows.append(("  parameters", f"{m['num_params']:,}"))
    if teacher:
        kept = "members kept" if teacher.get("members_kept") else "members not kept"
        rows.append(("combine", f"{teacher.get('combine', '-')} ({kept})"))
    rows += _views_rows(info)
    rows += _targets_rows(info)
    rows += _tokens_rows(info)
    rows += _features_rows(info)
    rows.append(("data", f"{data.get('spec', '-')} (fingerprint {data.get('fingerprint')})"))
    params = info.get("params") or {}
    rows.append(("params", " ".join(f"{k}={v}" for k, v in params.items()) or "-"))
    versions = info.get("created_with") or {}
    if "created_at" in info:  # caches written before run records
        rows.append(("created at", str(info["created_at"])))
    rows.append(("created with", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"))
    size, n = info["size_bytes"], info.get("num_samples") or 0
    unit = "token" if "token_summary" in info else "sample"
    per = f" ({size / n:.1f} bytes/{unit})" if n else ""
    rows.append(("size on disk", f"{size:,} bytes{per}"))
    return rows
