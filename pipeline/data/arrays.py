"""Inputs already held in arrays: NumPy .npz / .npy, Zarr, HDF5.

Every array source reads inputs x (N, ...), optional labels y (N,) and optional ids (N,);
without labels every row is unlabelled (-1), without ids the ids are row numbers. Inputs are
cast to float32 and, with ``?mean=...&std=...``, normalised per channel (axis 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data import (
    NORMALIZE_OPTIONS,
    LazyInputs,
    Normalize,
    Options,
    TransferSet,
    read_array_rows,
    register_source,
)

STORED_OPTIONS = ("labels", "ids", *NORMALIZE_OPTIONS)


@register_source("npz", options=NORMALIZE_OPTIONS)
def npz(arg: str, opts: Options) -> TransferSet:
    """NumPy .npz with arrays x (N, ...) and optional y (labels), ids, class_names.

    Loaded into memory; `np.savez(path, x=..., y=..., ids=...)` writes one.
    """
    path = existing_file(arg, opts.spec)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:
        raise PipelineError(
            f"--data {opts.spec}: {path} is not a readable .npz file ({type(e).__name__})"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PipelineError(f"--data {opts.spec}: {path} holds one array, not an .npz archive")
    with archive:
        if "x" not in archive.files:
            raise PipelineError(
                f"--data {opts.spec}: {path} has no array 'x' (has: {', '.join(archive.files)})"
            )
        arrays = {key: _npz_array(archive, key, opts.spec) for key in archive.files}
    x = check_inputs(arrays["x"], opts.spec, "x")
    norm = Normalize.from_options(opts)
    norm.check(opts.spec, x.shape[1])
    names = arrays.get("class_names")
    return TransferSet(
        spec=opts.spec,
        inputs=norm(x),
        labels=labels_array(arrays.get("y"), len(x), opts.spec, "y"),
        sample_ids=ids_array(arrays.get("ids"), len(x), opts.spec, "ids"),
        class_names=None if names is None else [str(n) for n in names],
    )


@register_source("npy", options=NORMALIZE_OPTIONS)
def npy(arg: str, opts: Options) -> TransferSet:
    """NumPy .npy of inputs (N, ...) alone: memory-mapped, unlabelled, ids are row numbers."""
    path = existing_file(arg, opts.spec)
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise PipelineError(
            f"--data {opts.spec}: {path} is not a readable .npy file ({type(e).__name__})"
        ) from None
    if not isinstance(x, np.ndarray):
        raise PipelineError(f"--data {opts.spec}: {path} is an .npz archive; use npz:{path}")
    return lazy_set(opts, x, None, None)


@register_source("zarr", options=STORED_OPTIONS)
def zarr_arrays(arg: str, opts: Options) -> TransferSet:
    """Zarr array, or group PATH#array (default x) with labels y and ids beside it."""
    import zarr

    text, _, name = arg.partition("#")
    path = Path(text).expanduser()
    if not path.exists():
        raise PipelineError(f"--data {opts.spec}: {path} not found")
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:
        raise PipelineError(
            f"--data {opts.spec}: {path} is not a Zarr array or group ({type(e).__name__})"
        ) from None
    if isinstance(root, zarr.Array):
        if name:
            raise PipelineError(f"--data {opts.spec}: {path} is an array, not a group")
        return lazy_set(opts, root, None, None)

    def lookup(key: str) -> Any:
        try:
            node = root[key]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Array) else None

    arrays = sorted(k for k, v in root.members(max_depth=None) if isinstance(v, zarr.Array))
    return _stored_set(opts, path, name or "x", lookup, arrays)


@register_source("hdf5", options=STORED_OPTIONS)
def hdf5(arg: str, opts: Options) -> TransferSet:
    """HDF5 dataset PATH#dataset (default x), with labels y and ids beside it."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers compression filters such as zstd)

    text, _, name = arg.partition("#")
    path = existing_file(text, opts.spec)
    try:
        f = h5py.File(path, "r")  # stays open: inputs are read from it batch by batch
    except OSError as e:
        raise PipelineError(
            f"--data {opts.spec}: {path} is not a readable HDF5 file ({e})"
        ) from None

    def lookup(key: str) -> Any:
        node = f.get(key)
        return node if isinstance(node, h5py.Dataset) else None

    datasets: list[str] = []
    f.visititems(lambda k, v: datasets.append(k) if isinstance(v, h5py.Dataset) else None)
    return _stored_set(opts, path, name or "x", lookup, datasets)


def _stored_set(opts: Options, path: Path, name: str, lookup, available: list[str]) -> TransferSet:
    """Inputs `name` from a file of named arrays, with labels and ids beside it (or named)."""
    x = lookup(name)
    if x is None:
        raise PipelineError(
            f"--data {opts.spec}: no array '{name}' in {path} "
            f"(has: {', '.join(available) or 'none'})"
        )
    parent = name.rpartition("/")[0]
    found = {}
    for option, default in (("labels", "y"), ("ids", "ids")):
        key = opts.get(option) or (f"{parent}/{default}" if parent else default)
        found[option] = lookup(key)
        if found[option] is None and opts.get(option):
            raise PipelineError(
                f"--data {opts.spec}: option {option}={key!r}: no such array in {path}"
            )
    y = None if found["labels"] is None else np.asarray(found["labels"][:])
    ids = None if found["ids"] is None else np.asarray(found["ids"][:])
    return lazy_set(opts, x, y, ids)


def lazy_set(
    opts: Options,
    x: Any,
    y: np.ndarray | None,
    ids: np.ndarray | None,
    divide: float = 1.0,
    class_names: list[str] | None = None,
) -> TransferSet:
    """A transfer set whose inputs are read from array-like `x` a batch at a time, divided by
    `divide` (255 for 8-bit pixels) and normalised by the spec's mean/std."""
    x = check_inputs(x, opts.spec, "x")
    norm = Normalize.from_options(opts, divide=divide)
    norm.check(opts.spec, x.shape[1])
    return TransferSet(
        spec=opts.spec,
        inputs=LazyInputs(x.shape[0], x.shape[1:], lambda rows: norm(read_array_rows(x, rows))),
        labels=labels_array(y, x.shape[0], opts.spec, "labels"),
        sample_ids=ids_array(ids, x.shape[0], opts.spec, "ids"),
        class_names=class_names,
    )


def existing_file(text: str, spec: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise PipelineError(f"--data {spec}: file not found: {path}")
    return path


def check_inputs(x: Any, spec: str, what: str) -> Any:
    """Inputs must be numeric with a sample axis and at least one more."""
    if len(x.shape) < 2:
        raise PipelineError(f"--data {spec}: {what} must be (N, ...) per sample, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        raise PipelineError(f"--data {spec}: {what} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.complexfloating):  # a float32 cast would drop the imaginary part
        raise PipelineError(
            f"--data {spec}: {what} is complex ({x.dtype}): store real features, e.g. the real "
            "and imaginary parts as two channels"
        )
    return x


def labels_array(y: np.ndarray | None, n: int, spec: str, what: str) -> np.ndarray:
    """Labels as (N,) int64, -1 for unknown; None means no labels at all.  # (N,)"""
    if y is None:
        return np.full(n, -1, np.int64)
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))
    )
    if y.shape != (n,) or not integral:
        hint = " (one-hot? store y.argmax(1))" if y.ndim == 2 else ""
        raise PipelineError(
            f"--data {spec}: {what} must be ({n},) integer class indices, "
            f"got {y.dtype} {y.shape}{hint}"
        )
    if n and y.min() < -1:
        raise PipelineError(f"--data {spec}: {what} has values below -1 (-1 means unknown)")
    return y.astype(np.int64)


def ids_array(ids: np.ndarray | None, n: int, spec: str, what: str) -> np.ndarray:
    """Sample ids as (N,) int64; None means row numbers.  # (N,)"""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise PipelineError(
            f"--data {spec}: {what} must be ({n},) integers, got {ids.dtype} {ids.shape}"
        )
    return ids.astype(np.int64)


def _npz_array(archive: Any, key: str, spec: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError:  # object arrays need pickle, which we never enable for user files
        raise PipelineError(
            f"--data {spec}: array '{key}' holds Python objects; save strings as a str array "
            "(np.array(names, dtype=str)) and numbers as numeric arrays"
        ) from None
