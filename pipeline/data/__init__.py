"""Transfer-set sources, addressed on the CLI as ``NAME:ARG[?key=value&...]``.

``digits:train``, ``npz:data/x.npz``, ``imagefolder:photos/train?size=32&mean=0.5&std=0.25``.
A source is a function registered with `@register_source("name", options=(...))` that takes
the text after the colon and its parsed `Options`, and returns a `TransferSet`. Every sample
carries a stable int64 id: the join key between a student's data and a teacher cache, never
the position in an epoch. `views` makes the seeded augmented views of a sample.

Shared ground. May import: pipeline.core.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.errors import PipelineError


@dataclass
class TransferSet:
    """A transfer set: ids and labels in memory, inputs in memory or read on demand.

    inputs: (N, ...) float32, the model's input per sample: a numpy array, or `LazyInputs`
        (files or on-disk arrays) that index like one and return numpy.
    labels: (N,) int64, ground truth or -1 where unknown.
    sample_ids: (N,) int64, unique and stable across runs.
    """

    spec: str
    inputs: np.ndarray | LazyInputs
    labels: np.ndarray
    sample_ids: np.ndarray
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """Sample `i` as (input (*input_shape) float32, label or -1): a map-style dataset,
        whose ids are `sample_ids` (what `pipeline.TeacherTargets` joins a cache by)."""
        return np.asarray(self.inputs[i : i + 1])[0], int(self.labels[i])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids (B,), inputs (B, *input_shape), labels (B,)) in order, `batch_size` rows at a time.

        Order is the data's own, so a `Fingerprint` updated batch by batch equals
        `fingerprint()`: a caller fingerprints on the fly, with no second pass.
        """
        if batch_size < 1:
            raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, len(self), batch_size)
        return self.read_ranges([slice(s, min(s + batch_size, len(self))) for s in starts])

    def read_ranges(
        self, ranges: Sequence[slice]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, inputs, labels) of each row range in `ranges`, in the order given.

        Read through a torch DataLoader: sources that decode files (image folders) decode in
        worker processes, a few ranges ahead of the caller; in-memory and array-backed sources
        read in-process. Keep ranges batch-sized: a range is one worker's unit of work.
        """
        from torch.utils.data import DataLoader

        dataset = _Ranges(self, list(ranges))
        workers = min(getattr(self.inputs, "workers", 0), len(dataset))
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is
        )
        for item in loader:
            if isinstance(item, PipelineError):  # raised in a worker: re-raise it here, cleanly
                raise PipelineError(str(item))
            yield item

    def fingerprint(self, scheme: str = "rows") -> str:
        """The data's fingerprint over sample ids and input bytes; see `Fingerprint`."""
        fp = Fingerprint(self.input_shape, str(self.inputs.dtype), scheme)
        for ids, x, _ in self.batches(self._rows_per(64 << 20)):
            fp.update(ids, x)
        return fp.hexdigest()

    def materialize(self) -> None:
        """Replace lazy inputs by one float32 array (N, ...), read batch by batch (in worker
        processes where the source decodes files)."""
        if isinstance(self.inputs, np.ndarray):
            return
        out = np.empty(self.inputs.shape, np.float32)
        start = 0
        for _, x, _ in self.batches(self._rows_per(4 << 20)):  # small: spread over workers
            out[start : start + len(x)] = x
            start += len(x)
        self.inputs = out

    def _rows_per(self, budget: int) -> int:
        """Rows per batch so that a batch of inputs holds about `budget` bytes."""
        row_bytes = max(1, int(np.prod(self.input_shape)) * self.inputs.dtype.itemsize)
        return max(1, min(4096, budget // row_bytes))


class _Ranges:
    """Row ranges of a transfer set as a DataLoader's map-style dataset: item i = range i."""

    def __init__(self, ts: TransferSet, ranges: list[slice]):
        self.ts, self.ranges = ts, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | PipelineError:
        rows = self.ranges[i]
        try:
            return self.ts.sample_ids[rows], self.ts.inputs[rows], self.ts.labels[rows]
        except PipelineError as e:
            # A worker's exception comes back wrapped in its traceback text; return the error
            # as a value instead so the user sees our one line.
            return e


def _as_is(batch: Any) -> Any:
    """DataLoader collate_fn: keep numpy batches as they are (the default makes tensors)."""
    return batch


class LazyInputs:
    """Inputs read on demand, indexed like a numpy array of shape (N, *sample_shape) float32.

    `read(rows)` receives sorted, duplicate-free int64 row numbers and returns those rows as
    float32 (len(rows), *sample_shape). An int, a slice, a bool mask or an int array all work
    and return numpy, so `ts.inputs[mask]` and `ts.inputs[a:b]` read only what they name.
    `workers` > 0 lets `TransferSet.batches` decode in DataLoader worker processes.
    """

    dtype = np.dtype(np.float32)

    def __init__(
        self,
        n: int,
        sample_shape: tuple[int, ...],
        read: Callable[[np.ndarray], np.ndarray],
        workers: int = 0,
    ):
        self.n, self.sample_shape, self.read, self.workers = n, tuple(sample_shape), read, workers

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows = np.arange(self.n)[key]  # numpy's own rules (and errors) for every index kind
        if rows.ndim == 0:
            out = self._read(rows.reshape(1))[0]
        else:
            out = self._read(rows)
            rest = (slice(None), *rest) if rest else ()
        return out[rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, *self.sample_shape), np.float32)
        if np.all(rows[1:] > rows[:-1]):
            return self.read(rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.read(unique)[inverse]


def read_array_rows(array: Any, rows: np.ndarray) -> np.ndarray:
    """Sorted `rows` of an array-like that supports slicing (np.memmap, zarr, h5py).

    One slice over the covering range, then a selection: on-disk arrays read fastest in
    ranges, and h5py's fancy indexing is slow.
    """
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    block = np.asarray(array[lo:hi])
    return block if hi - lo == len(rows) else block[rows - lo]


FINGERPRINT_SCHEMES = ("rows", "stream")  # "stream": caches written before version 0.x


class Fingerprint:
    """The data fingerprint: one value for the same ids and inputs in the same order, however
    the rows are batched, sharded or spread over ranks.

    Row i (its position in the data) contributes sha256(i, id, input bytes) read as a 256-bit
    integer; the fingerprint is sha256 of a header (per-sample shape, dtype, row count) and the
    sum of the contributions mod 2^256. The sum of any row range (`part`) is computed anywhere,
    recorded per shard and added up in shard order (`add`), so ranks never hash each other's
    rows. `scheme="stream"` is the fingerprint of caches written before that: sha256 streams
    over ids and inputs in row order, fed in order only.
    """

    def __init__(self, input_shape: tuple[int, ...], dtype: str, scheme: str = "rows"):
        if scheme not in FINGERPRINT_SCHEMES:
            raise ValueError(f"fingerprint scheme {scheme!r}: expected {FINGERPRINT_SCHEMES}")
        self.scheme = scheme
        self._shape, self._dtype = list(input_shape), dtype
        self._ids = hashlib.sha256()
        self._inputs = hashlib.sha256()
        self._sum = 0
        self._rows = 0

    def update(self, ids: np.ndarray, inputs: np.ndarray) -> None:
        """Add the next rows in order: ids (B,), inputs (B, ...)."""
        if self.scheme == "stream":
            self._ids.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
            self._inputs.update(np.ascontiguousarray(inputs).tobytes())
            self._rows += len(ids)
        else:
            self.add(part(self._rows, ids, inputs), len(ids))

    def add(self, value: int, rows: int) -> None:
        """Add the `part` of `rows` rows computed elsewhere ("rows" scheme)."""
        self._sum = (self._sum + value) % MODULUS
        self._rows += rows

    def hexdigest(self) -> str:
        if self.scheme == "stream":
            h = hashlib.sha256(json.dumps({"shape": self._shape, "dtype": self._dtype}).encode())
            h.update(self._ids.digest())
            h.update(self._inputs.digest())
            return h.hexdigest()
        header = {"scheme": "rows", "shape": self._shape, "dtype": self._dtype, "rows": self._rows}
        h = hashlib.sha256(json.dumps(header).encode())
        h.update(self._sum.to_bytes(32, "little"))
        return h.hexdigest()


MODULUS = 1 << 256  # the "rows" fingerprint's parts add up modulo this


def part(start: int, ids: np.ndarray, inputs: np.ndarray) -> int:
    """The "rows" fingerprint's contribution of rows start, start+1, ... : ids (B,), inputs
    (B, ...), as an integer below 2^256."""
    x = np.ascontiguousarray(inputs)
    keys = np.stack([np.arange(start, start + len(ids), dtype="<i8"), np.asarray(ids, "<i8")], 1)
    total = 0
    for key, row in zip(keys, x, strict=True):
        h = hashlib.sha256(key.tobytes())
        h.update(row)
        total += int.from_bytes(h.digest(), "little")
    return total % MODULUS


class Options:
    """The ``?key=value&...`` options of a --data spec, read with getters that name bad values."""

    def __init__(self, spec: str, text: str, allowed: tuple[str, ...]):
        self.spec = spec
        self.values: dict[str, str] = {}
        for part in filter(None, text.split("&")):
            key, sep, value = part.partition("=")
            if not sep:
                raise PipelineError(f"--data {spec}: option '{part}' needs a value (key=value)")
            if key not in allowed:
                valid = ", ".join(allowed) if allowed else "none"
                raise PipelineError(f"--data {spec}: unknown option '{key}' (valid: {valid})")
            if key in self.values:  # the spec is provenance: it must say one thing
                raise PipelineError(f"--data {spec}: option '{key}' is given twice")
            self.values[key] = value

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)

    def int(self, key: str, default: int) -> int:
        if key not in self.values:
            return default
        try:
            return int(self.values[key])
        except ValueError:
            raise self.error(key, "an integer") from None

    def floats(self, key: str) -> tuple[float, ...] | None:
        """Comma-separated floats, e.g. ``mean=0.485,0.456,0.406``."""
        if key not in self.values:
            return None
        try:
            return tuple(float(v) for v in self.values[key].split(","))
        except ValueError:
            raise self.error(key, "comma-separated numbers") from None

    def size(self, key: str) -> tuple[int, int] | None:
        """``32`` (square) or ``HxW`` such as ``24x32``, as (height, width)."""
        if key not in self.values:
            return None
        parts = self.values[key].lower().split("x")
        try:
            hw = tuple(int(p) for p in parts)
        except ValueError:
            raise self.error(key, "N or HxW, e.g. 32 or 24x32") from None
        if len(hw) == 1:
            hw = hw * 2
        if len(hw) != 2 or min(hw) < 1:
            raise self.error(key, "N or HxW, e.g. 32 or 24x32")
        return hw  # type: ignore[return-value]

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        """One of `choices`; the first is the default."""
        value = self.values.get(key, choices[0])
        if value not in choices:
            raise self.error(key, " or ".join(choices))
        return value

    def error(self, key: str, expected: str) -> PipelineError:
        return PipelineError(
            f"--data {self.spec}: option {key}={self.values[key]!r}: expected {expected}"
        )


@dataclass
class Normalize:
    """Inputs to float32: divide by `divide` (255 for 8-bit pixels), then (x - mean) / std.

    mean and std hold one value or one per channel (axis 1 of a batch (B, C, ...)), in the
    spirit of torchvision's ToTensor + Normalize, and give the same float32 numbers.
    """

    divide: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_options(cls, opts: Options, divide: float = 1.0) -> Normalize:
        norm = cls(divide, opts.floats("mean"), opts.floats("std"))
        if norm.std is not None and 0.0 in norm.std:
            raise opts.error("std", "non-zero numbers")
        return norm

    def check(self, spec: str, channels: int) -> None:
        """Refuse a mean/std whose length fits neither one value nor `channels` values."""
        for key, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise PipelineError(
                    f"--data {spec}: option {key} has {len(values)} values; the data has "
                    f"{channels} channels (give 1 or {channels})"
                )

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (B, C, ...) any dtype → float32
        x = np.array(x, dtype=np.float32, order="C")  # a copy, never a view of a mapped file
        if self.divide != 1.0:
            x = x / np.float32(self.divide)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32).reshape(shape)
        if self.std is not None:
            x = x / np.asarray(self.std, np.float32).reshape(shape)
        return x


NORMALIZE_OPTIONS = ("mean", "std")


class Source(NamedTuple):
    fn: Callable[[str, Options], TransferSet]
    options: tuple[str, ...]


_SOURCES: dict[str, Source] = {}


def register_source(name: str, options: tuple[str, ...] = ()) -> Callable:
    """Decorator: make `fn(arg, opts)` available as ``name:ARG[?opt=value&...]``.

    `options` lists the option keys the source reads; any other key is an error.
    """

    def wrap(fn: Callable[[str, Options], TransferSet]) -> Callable[[str, Options], TransferSet]:
        if name in _SOURCES:
            warnings.warn(
                f"source {name!r} is registered again: the new one replaces it", stacklevel=2
            )
        _SOURCES[name] = Source(fn, tuple(options))
        return fn

    return wrap


def list_sources() -> list[str]:
    _import_builtin_sources()
    return sorted(_SOURCES)


def describe_sources() -> list[tuple[str, tuple[str, ...], str]]:
    """(name, option keys, first docstring line) of every source, for `pipeline sources`."""
    _import_builtin_sources()
    return [
        (name, src.options, (src.fn.__doc__ or "").strip().splitlines()[0])
        for name, src in sorted(_SOURCES.items())
    ]


def load_transfer_set(spec: str, lazy: bool = False) -> TransferSet:
    """Load ``NAME:ARG[?options]`` through the registered source NAME.

    Inputs come back as one numpy array, unless `lazy`: then sources backed by files (image
    folders, npy, zarr, hdf5, CIFAR) keep `LazyInputs` that read only the rows asked for,
    which is what stage one wants for a transfer set larger than memory.
    """
    _import_builtin_sources()
    name, sep, rest = spec.partition(":")
    if not sep:
        raise PipelineError(f"--data {spec!r}: expected NAME:ARG, e.g. digits:train")
    if name not in _SOURCES:
        from pipeline.data.sequences import is_sequence_spec

        if is_sequence_spec(spec):
            raise PipelineError(
                f"--data {spec!r}: {name} is a sequence source (language models), which "
                "train-teacher, precompute-logits, train-student and evaluate take; this "
                "command takes a transfer set of samples"
            )
        valid = ", ".join(sorted(_SOURCES))
        raise PipelineError(
            f"--data {spec!r}: unknown source '{name}' (valid: {valid}; sequence sources for "
            "language models: `pipeline sources`)"
        )
    arg, _, query = rest.partition("?")
    source = _SOURCES[name]
    ts = source.fn(arg, Options(spec, query, source.options))
    _validate(ts)
    if not lazy:
        ts.materialize()
    return ts


def mask_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Labels with all but a seeded `fraction` of the known ones replaced by -1.  # (N,)"""
    if not 0.0 <= fraction <= 1.0:
        raise PipelineError(f"labeled_fraction must be in [0, 1], got {fraction}")
    known = np.flatnonzero(labels >= 0)
    keep = int(round(fraction * len(known)))
    rng = np.random.default_rng(seed)
    kept = rng.permutation(known)[:keep]
    out = np.full_like(labels, -1)
    out[kept] = labels[kept]
    return out


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows held out of training to measure it: a seeded `fraction` of the labelled rows,
    drawn before `mask_labels` so every student of one seed shares them.  # (N,) bool"""
    if not 0.0 <= fraction < 1.0:
        raise PipelineError(f"holdout must be in [0, 1), got {fraction}")
    known = np.flatnonzero(labels >= 0)
    held = np.zeros(len(labels), bool)
    # Its own stream (seed, 1): mask_labels keeps drawing from default_rng(seed) as before.
    held[
        np.random.default_rng([seed, 1]).permutation(known)[: int(round(fraction * len(known)))]
    ] = True
    return held


def default_workers() -> int:
    """DataLoader workers for sources that decode files: leave one core to the teacher."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def _validate(ts: TransferSet) -> None:
    n = len(ts.sample_ids)
    if len(ts.inputs) != n or len(ts.labels) != n:
        raise PipelineError(f"{ts.spec}: inputs, labels and ids differ in length")
    if len(np.unique(ts.sample_ids)) != n:
        ids, counts = np.unique(ts.sample_ids, return_counts=True)
        raise PipelineError(f"{ts.spec}: sample ids are not unique (e.g. {ids[counts > 1][0]})")


def _import_builtin_sources() -> None:
    from pipeline.data import arrays, cifar, digits, images  # noqa: F401
