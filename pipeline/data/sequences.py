"""Sequence transfer sets for token-level distillation: token ids per sequence, a length per
sequence, a stable id per sequence, and which positions are distilled.

``pystdlib:train`` (the built-in corpus), ``tokens:data/x.npz?vocab=32000``. A source is
registered with `@register_sequence_source`, like the sample sources of `pipeline.data`, and
returns a `SequenceSet`.

Position p of a sequence is the teacher's prediction of token p + 1, so a sequence of n tokens
has n - 1 positions with a label; every one of them is distilled (``distil=all``), or only
those that predict a completion token (``distil=completion``: positions prompt_length - 1
and after). A distilled position is a *row* of a token cache, in row-major order (sequence,
then position), and its id packs both: ``sequence_id << POSITION_BITS | position``.

The built-in corpus is the Python standard library's own source, read as bytes (vocabulary
256, no tokenizer): real text (code, comments and docstrings in English) that every machine
with Python has, several megabytes, with no download. Every top-level ``*.py`` file of the
running interpreter's standard library, sorted by name, is cut into sequences of ``length``
bytes; a file goes wholly to train or to test (by a hash of its name, 1 in 10 to test), so no
text is in both. It is this interpreter's library: another Python version gives other bytes,
which its fingerprint (in every cache's provenance) tells apart.
"""

from __future__ import annotations

import hashlib
import sysconfig
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data import Options

POSITION_BITS = 20  # positions per sequence < 2**20 (a million tokens)
MAX_SEQUENCE_ID = (1 << (63 - POSITION_BITS)) - 1
DISTIL = ("all", "completion")


@dataclass
class SequenceSet:
    """Token sequences: `tokens` (S, L) int32, the first `lengths[s]` of row s real (the rest
    is padding, never read), `sequence_ids` (S,) unique and stable, over `vocab` token ids."""

    spec: str
    tokens: np.ndarray  # (S, L) int32
    lengths: np.ndarray  # (S,) int64, 2..L
    sequence_ids: np.ndarray  # (S,) int64
    vocab: int
    prompt_lengths: np.ndarray | None = None  # (S,) int64, tokens before the completion
    distil: str = "all"
    tokenizer: dict[str, Any] = field(default_factory=lambda: {"kind": "bytes"})
    # Whether `vocab` is the tokenizer's own size (bytes, a tokenizer, ?vocab=) rather than
    # one more than the largest id seen: only then is a teacher's head past it padding.
    vocab_exact: bool = True

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def context(self) -> int:
        """The longest sequence's length: what a model's context must hold."""
        return int(self.lengths.max()) if len(self) else 0

    def starts(self) -> np.ndarray:
        """The first distilled position of each sequence.  # (S,)"""
        if self.distil == "completion":
            return np.maximum(self.prompt_lengths - 1, 0)
        return np.zeros(len(self), np.int64)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence index (N,), position (N,)) of every distilled position, row-major."""
        starts, stops = self.starts(), self.lengths - 1
        counts = np.maximum(stops - starts, 0)
        seq = np.repeat(np.arange(len(self)), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return seq, np.arange(len(seq)) - first + starts[seq]

    def token_ids(self) -> np.ndarray:
        """The row id of every distilled position: sequence id and position, packed.  # (N,)"""
        seq, pos = self.positions()
        return (self.sequence_ids[seq] << POSITION_BITS) | pos

    def next_tokens(self) -> np.ndarray:
        """The token each distilled position predicts (its label).  # (N,)"""
        seq, pos = self.positions()
        return self.tokens[seq, pos + 1].astype(np.int64)

    def fingerprint(self) -> str:
        """sha256 of the ids, lengths, real tokens and distilled positions, in order."""
        h = hashlib.sha256(f"{self.vocab}:{self.distil}".encode())
        for s in range(len(self)):
            h.update(np.int64([self.sequence_ids[s], self.lengths[s]]).tobytes())
            h.update(self.tokens[s, : self.lengths[s]].astype("<i4").tobytes())
        h.update(self.starts().astype("<i8").tobytes())
        return h.hexdigest()


class SequenceSource(NamedTuple):
    fn: Callable[[str, Options], SequenceSet]
    options: tuple[str, ...]


_SOURCES: dict[str, SequenceSource] = {}


def register_sequence_source(name: str, options: tuple[str, ...] = ()) -> Callable:
    """Decorator: make `fn(arg, opts)` available as ``name:ARG[?opt=value&...]``."""

    def wrap(fn: Callable[[str, Options], SequenceSet]) -> Callable[[str, Options], SequenceSet]:
        if name in _SOURCES:
            warnings.warn(f"sequence source {name!r} is registered again", stacklevel=2)
        _SOURCES[name] = SequenceSource(fn, tuple(options))
        return fn

    return wrap


def describe_sequence_sources() -> list[tuple[str, tuple[str, ...], str]]:
    """(name, option keys, first docstring line) of every sequence source."""
    return [
        (name, src.options, (src.fn.__doc__ or "").strip().splitlines()[0])
        for name, src in sorted(_SOURCES.items())
    ]


def is_sequence_spec(spec: str) -> bool:
    """Whether --data `spec` names a sequence source (token-level distillation)."""
    return spec.partition(":")[0] in _SOURCES


def load_sequences(spec: str) -> SequenceSet:
    """Load ``NAME:ARG[?options]`` through the registered sequence source NAME, checked."""
    name, sep, rest = spec.partition(":")
    if not sep or name not in _SOURCES:
        valid = ", ".join(sorted(_SOURCES))
        raise PipelineError(f"--data {spec!r}: not a sequence source (valid: {valid})")
    arg, _, query = rest.partition("?")
    source = _SOURCES[name]
    seqs = source.fn(arg, Options(spec, query, source.options))
    check(seqs)
    return seqs


def check(seqs: SequenceSet) -> None:
    """Refuse what no run can use, in one line naming the sequence: empty or one-token
    sequences, lengths past the array, token ids outside the vocabulary, repeated ids."""
    spec, s = seqs.spec, len(seqs)
    if s == 0:
        raise PipelineError(f"--data {spec}: no sequences")
    if seqs.tokens.ndim != 2 or seqs.lengths.shape != (s,) or seqs.sequence_ids.shape != (s,):
        raise PipelineError(f"--data {spec}: tokens must be (S, L) with a length and id per row")
    if (short := np.flatnonzero(seqs.lengths < 2)).size:
        raise PipelineError(
            f"--data {spec}: sequence id {int(seqs.sequence_ids[short[0]])} has "
            f"{int(seqs.lengths[short[0]])} tokens; a sequence needs at least 2 (one to predict)"
        )
    if int(seqs.lengths.max()) > seqs.tokens.shape[1]:
        raise PipelineError(f"--data {spec}: a length is longer than the token array's rows")
    if seqs.context >= 1 << POSITION_BITS:
        raise PipelineError(f"--data {spec}: sequences of more than {1 << POSITION_BITS} tokens")
    real = np.arange(seqs.tokens.shape[1])[None, :] < seqs.lengths[:, None]  # (S, L)
    bad = real & ((seqs.tokens < 0) | (seqs.tokens >= seqs.vocab))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise PipelineError(
            f"--data {spec}: sequence id {int(seqs.sequence_ids[row])} position {int(col)}: "
            f"token id {int(seqs.tokens[row, col])} is outside the vocabulary [0, {seqs.vocab})"
        )
    ids = seqs.sequence_ids
    if ids.min() < 0 or ids.max() > MAX_SEQUENCE_ID or len(np.unique(ids)) != s:
        raise PipelineError(f"--data {spec}: sequence ids must be unique, in [0, 2**43)")
    if seqs.distil not in DISTIL:
        raise PipelineError(f"--data {spec}: distil={seqs.distil!r}: expected all or completion")
    if seqs.distil == "completion" and seqs.prompt_lengths is None:
        raise PipelineError(f"--data {spec}: distil=completion needs prompt lengths")


# -- the built-in corpus --------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The running interpreter's top-level standard-library modules, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


@register_sequence_source("pystdlib", options=("length", "limit", "distil"))
def pystdlib(split: str, opts: Options) -> SequenceSet:
    """The Python standard library's source as bytes (vocabulary 256), split train or test."""
    if split not in ("train", "test"):
        raise PipelineError(f"--data pystdlib:{split}: split must be 'train' or 'test'")
    length, limit = opts.int("length", 128), opts.int("limit", 0)
    if length < 2 or limit < 0:
        raise PipelineError(f"--data {opts.spec}: length must be >= 2 and limit >= 0")
    rows, ids, lengths, next_id = [], [], [], 0
    for path in stdlib_files():
        data = np.frombuffer(path.read_bytes(), np.uint8)
        test = zlib.crc32(path.name.encode()) % 10 == 0
        for start in range(0, len(data), length):
            chunk = data[start : start + length]
            if len(chunk) >= 2 and test == (split == "test"):
                rows.append(np.pad(chunk, (0, length - len(chunk))))
                ids.append(next_id)
                lengths.append(len(chunk))
            next_id += 1  # ids count every chunk of both splits: a sequence's id is its own
        if limit and len(rows) >= limit:
            break
    rows, ids, lengths = rows[: limit or None], ids[: limit or None], lengths[: limit or None]
    return SequenceSet(
        spec=opts.spec,
        tokens=np.asarray(rows, np.int32).reshape(len(rows), length),
        lengths=np.asarray(lengths, np.int64),
        sequence_ids=np.asarray(ids, np.int64),
        vocab=256,
        distil=opts.choice("distil", ("all",)),
    )


@register_sequence_source("tokens", options=("vocab", "pad", "distil"))
def tokens(path: str, opts: Options) -> SequenceSet:
    """Token ids (S, L) from a .npz or .npy file, each sequence padded after its end.

    .npz: arrays `tokens`, optional `lengths`, `ids`, `prompt_lengths`; .npy: the tokens,
    each sequence ending at its trailing run of `pad`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PipelineError(f"--data {opts.spec}: no such file {file}")
    arrays = _read_arrays(file, opts.spec)
    toks = arrays["tokens"]
    if toks.ndim != 2 or not np.issubdtype(toks.dtype, np.integer):
        raise PipelineError(f"--data {opts.spec}: tokens must be an (S, L) integer array")
    vocab = opts.int("vocab", int(toks.max()) + 1 if toks.size else 1)
    lengths = arrays.get("lengths")
    if lengths is None:
        lengths = _unpadded_lengths(toks, opts)
    ids = arrays.get("ids", np.arange(len(toks)))
    prompts = arrays.get("prompt_lengths")
    return SequenceSet(
        spec=opts.spec,
        tokens=toks.astype(np.int32),
        lengths=np.asarray(lengths, np.int64),
        sequence_ids=np.asarray(ids, np.int64),
        vocab=vocab,
        prompt_lengths=None if prompts is None else np.asarray(prompts, np.int64),
        distil=opts.choice("distil", DISTIL),
        tokenizer={"kind": "ids"},
        vocab_exact="vocab" in opts.values,
    )


def _read_arrays(file: Path, spec: str) -> dict[str, np.ndarray]:
    try:
        if file.suffix == ".npy":
            return {"tokens": np.load(file, allow_pickle=False)}
        with np.load(file, allow_pickle=False) as z:
            if "tokens" not in z.files:
                raise PipelineError(f"--data {spec}: no array named 'tokens' in {file}")
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise PipelineError(f"--data {spec}: cannot read {file} ({e})") from None


def _unpadded_lengths(toks: np.ndarray, opts: Options) -> np.ndarray:
    """Each row's length: up to its trailing run of `pad` (every token without `pad`)."""
    pad = opts.int("pad", -1)
    if pad < 0:
        return np.full(len(toks), toks.shape[1], np.int64)
    real = toks != pad  # (S, L)
    last = toks.shape[1] - np.argmax(real[:, ::-1], axis=1)  # one past the last real token
    return np.where(real.any(1), last, 0).astype(np.int64)


from pipeline.data import text  # noqa: E402, F401  (registers jsonl: beside the sources above)
