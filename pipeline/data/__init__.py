"""Transfer-set sources, addressed on the CLI as ``NAME:ARG`` (e.g. ``digits:train``).

A source is a function registered with `@register_source("name")` that takes the text after
the colon and returns a `TransferSet`. Every sample carries a stable int64 id: the join key
between a student's data and a teacher cache, never the position in an epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError

_SOURCES: dict[str, Callable[[str], TransferSet]] = {}


@dataclass
class TransferSet:
    """A transfer set held as arrays.

    inputs: (N, ...) float32, the model's input per sample.
    labels: (N,) int64, ground truth or -1 where unknown.
    sample_ids: (N,) int64, unique and stable across runs.
    """

    spec: str
    inputs: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, inputs, labels) in order, `batch_size` rows at a time."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.sample_ids[start:stop], self.inputs[start:stop], self.labels[start:stop]

    def fingerprint(self) -> str:
        """sha256 over sample ids and input bytes; see `Fingerprint`."""
        fp = Fingerprint(self.input_shape, str(self.inputs.dtype))
        for ids, x, _ in self.batches(4096):
            fp.update(ids, x)
        return fp.hexdigest()


class Fingerprint:
    """Incremental data fingerprint, independent of how the data is batched.

    Ids and input bytes go to two separate sha256 streams (so batch boundaries do not move
    bytes between them), then one sha256 joins a header (per-sample shape, dtype) and both.
    """

    def __init__(self, input_shape: tuple[int, ...], dtype: str):
        self._header = json.dumps({"shape": list(input_shape), "dtype": dtype}).encode()
        self._ids = hashlib.sha256()
        self._inputs = hashlib.sha256()

    def update(self, ids: np.ndarray, inputs: np.ndarray) -> None:
        self._ids.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
        self._inputs.update(np.ascontiguousarray(inputs).tobytes())

    def hexdigest(self) -> str:
        h = hashlib.sha256(self._header)
        h.update(self._ids.digest())
        h.update(self._inputs.digest())
        return h.hexdigest()


def register_source(name: str) -> Callable:
    """Decorator: make a source available as ``name:ARG`` on the CLI."""

    def wrap(fn: Callable[[str], TransferSet]) -> Callable[[str], TransferSet]:
        _SOURCES[name] = fn
        return fn

    return wrap


def list_sources() -> list[str]:
    _import_builtin_sources()
    return sorted(_SOURCES)


def load_transfer_set(spec: str) -> TransferSet:
    """Load ``NAME:ARG`` through the registered source NAME."""
    _import_builtin_sources()
    name, sep, arg = spec.partition(":")
    if not sep:
        raise PipelineError(f"--data {spec!r}: expected NAME:ARG, e.g. digits:train")
    if name not in _SOURCES:
        valid = ", ".join(sorted(_SOURCES))
        raise PipelineError(f"--data {spec!r}: unknown source '{name}' (valid: {valid})")
    ts = _SOURCES[name](arg)
    _validate(ts)
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


def _validate(ts: TransferSet) -> None:
    n = len(ts.sample_ids)
    if len(ts.inputs) != n or len(ts.labels) != n:
        raise PipelineError(f"{ts.spec}: inputs, labels and ids differ in length")
    if len(np.unique(ts.sample_ids)) != n:
        raise PipelineError(f"{ts.spec}: sample ids are not unique")


def _import_builtin_sources() -> None:
    from pipeline.data import digits  # noqa: F401
