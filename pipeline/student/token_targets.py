"""A token cache's targets for a language-model student: in memory, or streamed a window of
sequences at a time within --cache-memory.

A token cache's rows are the distilled positions of its sequences in order, so the rows of a
run of consecutive sequences are one contiguous range: read in one call per node, never row
by row. When every row's targets fit the budget they are read once and the epoch is the
usual one (`pipeline.core.lm.Shuffled`: every sequence in a permutation seeded by (seed,
epoch)). Otherwise the sequences are cut into *windows* of consecutive sequences whose
targets take at most half the budget (the other half covers the read's copies); epoch e
visits the windows in a permutation seeded by (seed, e) and, within each, its sequences in a
permutation seeded by (seed, e, window), in batches that never span two windows. Only the
current window's targets are in memory. Both give every distilled token once per epoch; the
streamed batches differ from the in-memory ones, deterministically for one budget (which is
in the student's config, so a resumed run must keep it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import open_cache, schema
from pipeline.cache.layout import format_size
from pipeline.cache.tokens import require_token_cache
from pipeline.core.errors import PipelineError
from pipeline.core.lm import Positions, Shuffled
from pipeline.data.sequences import SequenceSet
from pipeline.student.targets import parse_size


class TokenTargetSource:
    """The sparse targets of a token cache (`nodes` topk/* or sample/*), served by row."""

    def __init__(self, cache: Path, seqs: SequenceSet, cfg: Any):
        self.cache_path, self.seqs, self.cfg = cache, seqs, cfg
        self._cache = open_cache(cache)
        try:
            self._check(cfg)
            c = self._cache
            self.attrs = dict(c.attrs)
            self.nodes = [n.name for n in c.nodes() if n.name.startswith(("topk/", "sample/"))]
            row = sum(  # bytes per row, as held in memory
                math.prod(c.backend.shape(n)[1:]) * _held_size(c.backend.dtype(n))
                for n in self.nodes
            )
            budget = parse_size(cfg.cache_memory, cfg.source("cache_memory"))
            self.streamed = c.num_samples * row > budget
            self.windows = _windows(seqs, row, budget // 2, cfg) if self.streamed else None
            self.num_rows = c.num_samples
            self._arrays: dict[str, torch.Tensor] = {}
            self._offset, self._loaded = 0, None
            if not self.streamed:
                self.load(0, c.num_samples)
                self.close()
        except BaseException:
            self.close()
            raise

    def _check(self, cfg: Any) -> None:
        """A token cache of these sequences, of the kind the loss reads."""
        c = self._cache
        require_token_cache(c, self.cache_path, self.seqs)
        sampled = c.attrs.get(schema.TARGETS) == "sampled"
        if cfg.loss != "ce" and sampled != (cfg.loss == "kl-sampled"):
            kind, fits = ("sampled", "kl-sampled") if sampled else ("top-k", "kl, kl-topk, ...")
            raise PipelineError(
                f"{cfg.source('loss')} {cfg.loss} does not read the {kind} targets of "
                f"--cache {self.cache_path}; use {fits}"
            )

    def plan(self, batch_size: int, seed: int):
        """The epochs' batches: `Shuffled` in memory, windowed when streamed."""
        if not self.streamed:
            return Shuffled(len(self.seqs), batch_size, seed)
        return Windowed(self, batch_size, seed)

    def load(self, start: int, stop: int) -> None:
        """Hold the targets of rows [start, stop) and only those."""
        if self._loaded == (start, stop):
            return
        self._arrays = {}  # the previous window goes first: at most one in memory
        rows = slice(start, stop)
        self._arrays = {n: torch.from_numpy(_wide(np.asarray(self._cache.read(n, rows))[:, 0]))
                        for n in self.nodes}  # fmt: skip
        self._offset, self._loaded = start, (start, stop)

    def rows(self, name: str, rows: np.ndarray) -> torch.Tensor | None:
        """Node `name`'s targets at cache rows `rows` (N,), or None when the cache has none."""
        if name not in self._arrays:
            return None
        return self._arrays[name][torch.from_numpy(rows - self._offset)]

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None


class Windowed:
    """Epoch e: the windows in a permutation seeded by (seed, e), each window's sequences in
    one seeded by (seed, e, window), in batches within a window; each window's targets are
    loaded before its batches."""

    def __init__(self, source: TokenTargetSource, batch_size: int, seed: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        sizes = np.diff(source.windows)
        self.steps = int(sum(math.ceil(n / batch_size) for n in sizes))

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        bounds, where = self.source.windows, Positions(self.source.seqs)
        first_rows = np.append(where.first_row, self.source.num_rows)
        for w in np.random.default_rng([self.seed, epoch]).permutation(len(bounds) - 1):
            a, b = int(bounds[w]), int(bounds[w + 1])
            self.source.load(int(first_rows[a]), int(first_rows[b]))
            order = a + np.random.default_rng([self.seed, epoch, int(w)]).permutation(b - a)
            for i in range(0, b - a, self.batch_size):
                yield np.sort(order[i : i + self.batch_size])


def _windows(seqs: SequenceSet, row_bytes: int, limit: int, cfg: Any) -> np.ndarray:
    """Window bounds over the sequences (W + 1,): runs of consecutive sequences whose
    targets take at most `limit` bytes each."""
    counts = np.maximum(seqs.lengths - 1 - seqs.starts(), 0)  # (S,) distilled positions
    need = counts * row_bytes  # (S,) bytes of each sequence's targets
    if need.max() > limit:
        s = int(np.argmax(need))
        raise PipelineError(
            f"sequence id {int(seqs.sequence_ids[s])}'s targets alone take "
            f"{format_size(int(need[s]))}, more than half of {cfg.source('cache_memory')} "
            f"{cfg.cache_memory}; raise it"
        )
    bounds, total = [0], 0
    for s, n in enumerate(need):
        if total + n > limit:
            bounds.append(s)
            total = 0
        total += n
    return np.array([*bounds, len(seqs)])


def _held_size(dtype: np.dtype) -> int:
    """Bytes per value in memory: integers are held as int64 (`_wide`)."""
    return 8 if np.issubdtype(dtype, np.integer) else np.dtype(dtype).itemsize


def _wide(a: np.ndarray) -> np.ndarray:
    """Indices and counts as int64 (torch indexes with them), values as they are."""
    return a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a
