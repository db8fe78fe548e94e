"""Stage one's engine: run the teacher (or an ensemble) once over a transfer set and write
its raw logits into a cache.

With an augmentation (`--augment`, `pipeline.data.views`), the teachers run on V views of every
sample: view v of sample i is its input augmented with the seed `views/seed`[i, v], a function
of (`seed`, sample id, v) alone, and `logits`[i, v] is the teachers' output on it. Without one,
the teachers see the raw inputs and the cache is exactly what earlier versions wrote (V = 1, no
views/seed node, the same attributes).

With `--features` (`pipeline.teacher.features`), the teacher's intermediate outputs are stored too,
per view, as the nodes `features/<name>`: the hook kinds from the same forward call as that view's
logits, the gradient kinds from a second call with autograd.

With `--topk K` (`pipeline.cache.sparse`), the full logits are not stored: per view, the K largest
combined raw logits (`topk/values`, float32 whatever `--dtype`), their classes (`topk/indices`)
and the exact log-sum-exp of all C (`topk/lse`). With `--sample-k K`, K classes drawn from the
combined distribution at T = 1 (`sample/indices`, `sample/counts`, and with `--sample-values`
their raw logits), row by row from a generator seeded by (seed, sample id), or by the view's
seed when views are augmented. The attribute `targets` says which ("topk" / "sampled").

Before anything is written, the projected size of every node is printed (stderr), and a cache
larger than `--max-cache-size` (default: half the free space where it goes) is refused.

Work goes shard by shard. The teachers compute shard k+1 while a background thread hashes
shard k's inputs into its part of the data fingerprint, combines the members and writes it, so
the cache costs almost nothing on top of inference. A shard's forward calls are its rows cut at
the multiples of `batch_size` (and at its own ends), so they never depend on which process
computes it or what it computed before. A resumed run (see `pipeline.cache.writer`) reads
the finished shards' inputs only to check their fingerprint parts, computes the rest with
exactly the forward calls an uninterrupted run makes, and so ends byte-identical.

Under `torchrun --nproc-per-node N` (gloo on CPU, NCCL on GPUs, any number of nodes), rank 0
creates or resumes the partial cache, every rank then takes every N-th unfinished shard (and
every N-th finished one to check), computes and writes whole shards of its own with their
records, and once all are done rank 0 adds the fingerprint parts up in shard order and
finishes the cache: the same bytes as one process, resumable with any number of ranks.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import CacheWriter, layout, open_cache, schema, store
from pipeline.cache.backends import FORMATS, format_for_path
from pipeline.cache.ensemble import COMBINE_METHODS
from pipeline.cache.features import parse_features
from pipeline.cache.layout import format_size, parse_size
from pipeline.cache.schema import LOGITS_DTYPE, VIEW_SEEDS, projected
from pipeline.cache.sparse import (
    MAX_SAMPLE_K,
    count_dtype,
    index_dtype,
)
from pipeline.core import distributed
from pipeline.core.config import PrecomputeConfig, as_dict
from pipeline.core.device import (
    ONE_THREAD_BELOW_FLOPS,
    choose_threads,
    forward_flops,
    resolve_device,
)
from pipeline.core.errors import PipelineError
from pipeline.core.runrecord import write_record
from pipeline.data import TransferSet, load_transfer_set
from pipeline.data.sequences import is_sequence_spec
from pipeline.data.views import AugmentSpec, Views
from pipeline.teacher.features import Feature, resolve
from pipeline.teacher.shards import compute_shards, data_fingerprint, to_device
from pipeline.teacher.teachers import Teacher, load_teachers

PROBE_ROWS = 8  # rows each teacher is tried on before the run (shapes, class count)


def precompute_logits(
    teachers: str | list[str],
    data: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    params: str | Path | None = None,
    **options: Any,
) -> Path | str:
    """`pipeline precompute-logits` from Python: cache the raw logits of `teachers` (one
    source, or several for an ensemble: checkpoint, TorchScript, .onnx, pkg.mod:fn[@weights])
    over transfer set `data` (e.g. "digits:train") at `out` (DIR.zarr, FILE.h5 or a URL).
    `options` are the precompute_logits keys (topk=, views=, augment=, features=, dtype=...),
    overlaid on `params`' section and the defaults, checked as the command checks them.
    Returns where the cache is."""
    from pipeline.core.config import layered, load_params

    given = {"teachers": [teachers] if isinstance(teachers, str) else list(teachers), **options}
    where = str(params) if params is not None else None
    cfg = layered(PrecomputeConfig, load_params(params), where, "precompute_logits", given)
    return precompute(cfg, data, out, overwrite)


def precompute(
    cfg: PrecomputeConfig,
    data: str,
    out: Path | str,
    overwrite: bool = False,
    max_cache_size: int | str | None = None,
) -> Path | str:
    """Cache the combined raw logits of the teachers `cfg.teachers` over `data` at `out`
    (Zarr or HDF5); with `cfg.keep_members` each member's logits too (members/logits), with
    `cfg.features` the teacher's feature targets (features/<name>). A cache projected larger
    than `max_cache_size` (bytes or e.g. "20GiB"; None: half the free disk space) is refused.
    Re-running the same call after a crash resumes from the finished shards."""
    out = store.location(out)  # a local path, or a URL (object storage, Zarr)
    ranks = distributed.from_env()  # torchrun's, else one process
    start = time.perf_counter()
    views = check_options(cfg, out, overwrite)
    if is_sequence_spec(data):  # token-level distillation: a token cache
        return _precompute_tokens(cfg, data, out, overwrite)
    specs = parse_features(cfg.features, cfg.source("features"))
    limit = _size_limit(max_cache_size, out)
    if ranks.active and isinstance(out, str) and out.startswith("memory://"):
        raise PipelineError(f"{out}: memory:// lives in one process; ranks cannot share it")
    device = distributed.start(ranks, resolve_device(cfg.device))
    try:
        ts = _load_data(data)
        views.spec.check_shape(ts.input_shape, cfg.source("augment"))
        members = load_members(cfg.teachers, ts, device)
        probe = ts.inputs[:PROBE_ROWS]
        # Set whatever ran before in this process: gradient features are summed in a
        # thread-dependent order, and a resumed cache must match bytes for bytes.
        threads = _threads(cfg, members, probe, device)
        features = resolve(specs, members, probe, cfg.source("features"), cfg.seed)
        class_names = _class_names(members, ts)  # refused here, before anything is written
        shape = _shape_args(cfg, members, views, features)
        _check_size(cfg, len(ts), shape, limit, ranks.main)
        writer = _open_writer(cfg, out, overwrite, device, members, ts, data, views, shape, ranks)
        if writer is None:  # a killed run of this command had finished it: now in place
            if ranks.main:
                print(
                    f"note: {out}: finished by an interrupted run of this command; now in "
                    "place (nothing recomputed)",
                    file=sys.stderr,
                )
            return out
        _note_idle(writer, ranks, len(ts))
        with writer:
            compute_shards(cfg, writer, members, ts, data, device, views, features, ranks)
            distributed.barrier(ranks)  # every rank's shards are recorded
            if not ranks.main:
                return out
            writer.reload()
            fingerprint = data_fingerprint(ts, writer)
            provenance = _provenance(cfg, members, ts, data, fingerprint, class_names, views)
            path = writer.finish(provenance)
            if isinstance(path, Path):  # object storage: no run record
                _record(path, time.perf_counter() - start, threads, ranks)
            return path
    finally:
        distributed.stop(ranks)


def _precompute_tokens(cfg: PrecomputeConfig, data: str, out, overwrite: bool):
    from pipeline.teacher.sequences import precompute_tokens  # its own engine

    return precompute_tokens(cfg, data, out, overwrite)


def _record(path: Path, seconds: float, threads: int, ranks: distributed.Ranks) -> None:
    """The run record beside the cache: time, threads, ranks, and the cache's identity."""
    with open_cache(path) as done:
        identity = done.identity
    facts = {"command": "precompute-logits", "seconds": round(seconds, 3), "threads": threads}
    write_record(path, {**facts, "ranks": ranks.world}, cache=identity)


def _note_idle(writer: CacheWriter, ranks: distributed.Ranks, num_rows: int) -> None:
    """Say (rank 0) when some ranks have no shard to compute, and how to give each one."""
    if ranks.main and writer.num_shards < ranks.world:
        idle = ranks.world - writer.num_shards
        print(
            f"note: {writer.num_shards} of {ranks.world} ranks have a shard to compute "
            f"({writer.shard_rows} rows each), {idle} stay idle (a shard is a rank's unit "
            f"of work; {idle_advice(num_rows, writer.chunk_rows, ranks.world)} gives each "
            "rank one)",
            file=sys.stderr,
        )


def idle_advice(num_rows: int, chunk_rows: int, ranks: int) -> str:
    """The layout options that give each of `ranks` ranks a shard of `num_rows` rows stored
    in chunks of `chunk_rows` (a shard is whole chunks; lowering --chunk-rows alone leaves
    --chunks-per-shard's default of up to 16384 rows per shard)."""
    target = max(1, num_rows // ranks)  # rows per shard at most: then ceil(N / s) >= ranks
    if chunk_rows <= target:
        return f"--chunks-per-shard {target // chunk_rows}"
    return f"--chunk-rows {target} --chunks-per-shard 1"


def _threads(cfg: PrecomputeConfig, members: list[Teacher], probe: np.ndarray, device) -> int:
    """Set torch's CPU threads for the teachers (`cfg.threads`, else the `choose_threads`
    rule on their summed FLOPs; a member torch cannot count, as ONNX, counts as large)."""
    x = to_device(np.ascontiguousarray(probe[:1]), device)
    flops = sum(
        ONE_THREAD_BELOW_FLOPS if t.module is None else forward_flops(t.module, x) for t in members
    )
    threads = choose_threads(flops, cfg.threads)
    torch.set_num_threads(threads)
    return threads


def check_options(cfg: PrecomputeConfig, out: store.Location, overwrite: bool) -> Views:
    """The options checked before anything loads (milliseconds, not after the data and
    teachers have loaded); returns the views they ask for."""
    format_for_path(out, cfg.format)
    store.check_output(out, overwrite)
    if not cfg.teachers:
        raise PipelineError(
            "no teacher: give --teacher, or `teachers` in the precompute_logits section of "
            "the params file"
        )
    return check_config(cfg)


def check_config(cfg: PrecomputeConfig) -> Views:
    """The values of `cfg` alone (no paths, no teachers): what `pipeline check-params` checks
    of the precompute_logits section, so a bad dtype fails before DVC deletes a cache."""
    if cfg.format not in ("auto", *FORMATS):
        raise PipelineError(f"{cfg.source('format')} {cfg.format!r}: expected auto, zarr or hdf5")
    if cfg.combine not in COMBINE_METHODS:
        valid = ", ".join(COMBINE_METHODS)
        raise PipelineError(f"{cfg.source('combine')} {cfg.combine!r}: expected one of {valid}")
    cfg.validate()  # its declared ranges, for a config built in code too
    layout.stored_dtype(cfg.dtype, cfg.source("dtype"))
    layout.parse_compression(
        layout.compression_for(cfg.compression, "zarr"), cfg.source("compression")
    )
    layout.chunks_per_shard_for(layout.chunk_rows_for(1, cfg.chunk_rows), cfg.chunks_per_shard)
    _check_sparse_options(cfg)
    return _views(cfg)


def _check_sparse_options(cfg: PrecomputeConfig) -> None:
    """Sparse targets: one kind at a time, of the combined logits only."""
    if cfg.topk and cfg.sample_k:
        raise PipelineError(
            f"{cfg.source('topk')} and {cfg.source('sample_k')}: choose one kind of sparse targets"
        )
    kind = "topk" if cfg.topk else "sample_k" if cfg.sample_k else ""
    if kind and cfg.keep_members:
        raise PipelineError(
            f"{cfg.source(kind)} with {cfg.source('keep_members')}: sparse targets keep the "
            "combined logits only (members/logits would store every logit again); drop one"
        )
    if cfg.sample_k > MAX_SAMPLE_K:
        raise PipelineError(
            f"{cfg.source('sample_k')} {cfg.sample_k}: at most {MAX_SAMPLE_K} draws per view"
        )
    if cfg.sample_values and not cfg.sample_k:
        raise PipelineError(f"{cfg.source('sample_values')} needs --sample-k K")


def sparse_shape(
    cfg: PrecomputeConfig,
    num_classes: int,
    row_seed: str = "(seed, sample id); (seed, view seed) when views are augmented",
) -> tuple[dict[str, int], dict]:
    """The dims and attributes that declare the sparse nodes `cfg` asks for (none: {}, {}),
    once the teachers' class count C is known; `row_seed` says what seeds a row's draw."""
    if cfg.topk > num_classes:
        raise PipelineError(
            f"{cfg.source('topk')} {cfg.topk}: more than the {num_classes} classes the teacher "
            "outputs (K <= C; 0 keeps the full logits)"
        )
    if cfg.topk:
        record = {"k": cfg.topk, "index_dtype": str(index_dtype(num_classes))}
        return {schema.TOPK_DIM: cfg.topk}, {schema.TARGETS: "topk", schema.TOPK: record}
    if not cfg.sample_k:
        return {}, {}
    width = min(cfg.sample_k, num_classes)
    record = {
        "k": cfg.sample_k,
        "width": width,
        "index_dtype": str(index_dtype(num_classes)),
        "count_dtype": str(count_dtype(cfg.sample_k)),
        "seed": cfg.seed,
        "proposal_temperature": 1.0,
        "values": cfg.sample_values,
        "row_seed": row_seed,
    }
    return {schema.SAMPLE_DIM: width}, {schema.TARGETS: "sampled", schema.SAMPLE: record}


def _views(cfg: PrecomputeConfig) -> Views:
    """The views `cfg` asks for: V = `views` under the `augment` spec, seeded by `seed`."""
    spec = AugmentSpec.parse(cfg.augment, cfg.source("augment"))
    if cfg.views > 1 and not spec:
        raise PipelineError(
            f"{cfg.source('views')} {cfg.views} without an augmentation: every view would be "
            "the same input; give --augment SPEC (e.g. crop:pad=4,flip) or 1 view"
        )
    return Views(spec, cfg.views, cfg.seed)


def _load_data(data: str) -> TransferSet:
    """The transfer set, lazy: inputs are read batch by batch as the teachers consume them,
    never all at once."""
    ts = load_transfer_set(data, lazy=True)
    if len(ts) == 0:
        raise PipelineError(f"--data {data}: no samples")
    return ts


def load_members(teachers: list[str], ts: TransferSet, device) -> list[Teacher]:
    """The teachers `teachers` on `device`, probed on the first rows of `ts` (shapes, class
    count): how precompute loads them, and how `pipeline verify --teacher` does."""
    return [t.to(device) for t in load_teachers(teachers, ts.inputs[:PROBE_ROWS])]


def _shape_args(
    cfg: PrecomputeConfig, members: list[Teacher], views: Views, features: list[Feature]
) -> dict[str, Any]:
    """What sizes the cache's nodes, as `CacheWriter` (and `projected`) take it: the views'
    seeds only with an augmentation, the features declared in the `features` attribute."""
    dims = {name: size for f in features for name, size in f.dims().items()}
    attrs = {"features": {f.spec.name: f.record() for f in features}} if features else {}
    sparse_dims, sparse_attrs = sparse_shape(cfg, members[0].num_classes)
    return {
        "num_classes": members[0].num_classes,
        "num_views": views.count,
        "num_members": len(members) if cfg.keep_members else 0,
        "nodes": [VIEW_SEEDS] if views.spec else [],
        "dims": {**dims, **sparse_dims},
        "attrs": {**attrs, **sparse_attrs},
    }


def _size_limit(max_cache_size: int | str | None, out: store.Location) -> tuple[int, str] | None:
    """The most bytes the cache may take, and how to say where that figure came from: the
    option, else half the free space on the disk `out` goes to, counting what a resumed run's
    partial cache already holds as free (None: not known, e.g. object storage)."""
    if max_cache_size is not None:
        size = parse_size(max_cache_size, "--max-cache-size")
        return size, f"--max-cache-size {format_size(size)}"
    if isinstance(out, str):
        return None
    where = out.absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
        partial = out.with_name(out.name + ".partial")
        if partial.is_dir() and not partial.is_symlink():
            free += sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    except OSError:
        return None
    return free // 2, f"--max-cache-size (default: half the {format_size(free)} free at {where})"


def _check_size(
    cfg: PrecomputeConfig,
    n: int,
    shape: dict[str, Any],
    limit: tuple[int, str] | None,
    show: bool = True,
) -> None:
    """Print (when `show`) the projected size of every node (stderr, one line each, before
    compression) and refuse a cache larger than `limit`, naming the node that takes the most."""
    plan = projected(n, dtype=cfg.dtype, **shape)
    total = sum(nbytes for *_, nbytes in plan)
    width = max(len(node.name) for node, *_ in plan)
    lines = [f"projected cache size: {format_size(total)} for {n} samples (before compression)"]
    for node, dims, nbytes in plan:
        word = cfg.dtype if node.dtype == LOGITS_DTYPE else node.dtype
        lines.append(
            f"  {node.name:<{width}}  {dims} {word}: {format_size(nbytes)} "
            f"({format_size(nbytes // n)}/sample)"
        )
    if show:
        print("\n".join(lines), file=sys.stderr, flush=True)
    if limit is not None and total > limit[0]:
        node, dims, nbytes = max(plan, key=lambda p: p[2])
        raise PipelineError(
            f"projected cache size {format_size(total)} (before compression) exceeds "
            f"{limit[1]}; the largest node is {node.name} {dims}: {format_size(nbytes)} "
            f"({format_size(nbytes // n)}/sample); store fewer views or features, or raise "
            "--max-cache-size"
        )


def _open_writer(
    cfg: PrecomputeConfig,
    out: store.Location,
    overwrite: bool,
    device,
    members: list[Teacher],
    ts: TransferSet,
    data: str,
    views: Views,
    shape: dict[str, Any],
    ranks: distributed.Ranks,
) -> CacheWriter | None:
    """The cache writer: refuses labels the teachers cannot output before writing anything,
    and resumes an interrupted run of the same command (same views and features included);
    None when such a run had finished the cache and it has now been moved into place.
    Under torchrun rank 0 opens the partial cache and the other ranks join it; all know the
    finished shards before any rank writes one."""
    make = functools.partial(
        CacheWriter,
        out,
        sample_ids=ts.sample_ids,
        labels=ts.labels,
        **shape,
        dtype=cfg.dtype,
        compression=cfg.compression,
        chunk_rows=cfg.chunk_rows,
        chunks_per_shard=cfg.chunks_per_shard,
        fmt=cfg.format,
        overwrite=overwrite,
        run=_run_record(cfg, device, members, ts, data, views),
    )
    return open_shared(make, ranks, device)


def open_shared(
    make: Callable[..., CacheWriter], ranks: distributed.Ranks, device
) -> CacheWriter | None:
    """`make()` on rank 0, `make(join=True)` on the others once it exists; None on every rank
    when rank 0 found the cache finished by a killed run of the command (now in place). No
    rank writes a shard before every rank has read the finished shards' records."""
    writer = make() if ranks.main else None
    # Rank 0 has created or resumed the partial cache, or published a killed run's whole one.
    done = writer is not None and writer.finished
    if distributed.broadcast_bytes(ranks, b"1" if done else b"", device):
        return None
    writer = writer or make(join=True)
    distributed.barrier(ranks)  # no rank writes a shard before every rank has read the records
    return writer


def _run_record(
    cfg: PrecomputeConfig,
    device,
    members: list[Teacher],
    ts: TransferSet,
    data: str,
    views: Views,
) -> dict[str, Any]:
    """What must match for a partial cache to be resumed instead of refused (the views'
    spec, count, seed and algorithm included)."""
    # Teachers are matched by weights below, not by the paths they were given as.
    params = {k: v for k, v in _params(cfg, views).items() if k != "teachers"}
    record = {
        "params": params,
        "device": torch.device(device).type,
        "torch": torch.__version__,
        "teachers": [{"name": t.name, "sha256": t.sha256} for t in members],
        "data": {
            "spec": data,
            "input_shape": list(ts.input_shape),
            "input_dtype": str(ts.inputs.dtype),
            "fingerprint_scheme": "rows",
        },
    }
    if views.spec:
        record["views"] = views.record()
    return record


def _params(cfg: PrecomputeConfig, views: Views) -> dict[str, Any]:
    """The resolved params as recorded, with the spec in canonical form. Without views
    (V = 1, no augmentation) `views` and `augment` are left out, and without features
    `features`, so such a cache holds exactly the attributes of versions before them."""
    params = as_dict(cfg)
    if views.spec:
        params["augment"] = views.spec.canonical
    else:
        del params["views"], params["augment"]
    if params["features"]:
        params["features"] = [f.canonical for f in parse_features(cfg.features)]
    else:
        del params["features"]
    del params["threads"]  # a run's setting, in its run record
    for key, off in (("topk", 0), ("sample_k", 0), ("sample_values", False), ("precision", "fp32")):
        if params[key] == off:  # full logits: the params of versions before sparse targets
            del params[key]
    return params


def _class_names(members: list[Teacher], ts: TransferSet) -> list[str] | None:
    """The teachers' own class names, else the data's when they count the same classes.

    Names the teacher gives must count its classes: a cache whose class_names disagree with its
    logits would only fail `verify` after the whole run.
    """
    c = members[0].num_classes
    named = next((t for t in members if t.class_names), None)
    if named is not None:
        if len(named.class_names) != c:
            raise PipelineError(
                f"--teacher {named.source}: {len(named.class_names)} class names for the "
                f"{c} classes it outputs; fix its class_names"
            )
        return list(named.class_names)
    if ts.class_names and len(ts.class_names) == c:
        return list(ts.class_names)
    return None


def _provenance(
    cfg: PrecomputeConfig,
    members: list[Teacher],
    ts: TransferSet,
    data: str,
    fingerprint: str,
    class_names: list[str] | None,
    views: Views,
) -> dict[str, Any]:
    """The cache's provenance attributes; `views` (augment spec, its digest, seed) only when
    the teachers saw augmented views (V is `num_views`)."""
    import h5py
    import numcodecs
    import zarr

    import pipeline

    provenance = {
        "class_names": class_names,
        "teacher": {
            "members": [t.provenance() for t in members],
            "combine": cfg.combine,
            "members_kept": cfg.keep_members,
        },
        "data": {
            "spec": data,
            "source": data.partition(":")[0],
            "split": data.partition(":")[2],
            "fingerprint": fingerprint,
            "fingerprint_scheme": "rows",
            "input_shape": list(ts.input_shape),
        },
        "params": _params(cfg, views),
        "created_with": {
            "package": f"kd-pipeline {pipeline.__version__}",
            "torch": torch.__version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__,
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
        },
    }
    if views.spec:
        provenance["views"] = views.record()
    return provenance
