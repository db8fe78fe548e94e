"""Augmentation-consistent views: an augmentation spec, per-view seeds, deterministic views.

A cache stores, for view v of sample i, only a seed (`views/seed`, (N, V) int64). The seed is a
pure function of (global seed, sample id, v), and the view is a pure function of (input, seed),
so stage two regenerates view (i, v) bit for bit whatever the row, batch, worker, rank or epoch.

Spec grammar (`--augment`, or `augment` in the precompute_logits section of params.yaml)::

    SPEC := "" | "none" | STEP ("," STEP)*      steps apply in the order written
    STEP := KIND (":" KEY "=" VALUE)*           each kind at most once

    crop[:pad=4]     (C, H, W) images: zero-pad `pad` pixels on every side, take a random H x W
                     window (the CIFAR recipe; i.e. a random translation by -pad..pad per axis)
    flip[:p=0.5]     (C, H, W) images: mirror left-right with probability p
    shift:max=M      (L,) or (C, L) signals and (C, H, W) images: translate by a random integer
                     in -M..M along every spatial axis, zero-filled
    noise:std=S      any input: add Gaussian noise with standard deviation S

e.g. "crop:pad=4,flip", "shift:max=2", "shift:max=2,noise:std=0.05". No step changes the
input's shape. The canonical form (`AugmentSpec.canonical`) writes every parameter, defaults
included ("crop:pad=4,flip:p=0.5"), and is what a cache records with its `spec_digest`.

Randomness: row b of a batch is transformed with its own generator, `Philox(key=seeds[b])`,
which each step draws from in turn (`_draw_*`); nothing is shared between rows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import FLOAT32_MAX
from pipeline.core.errors import PipelineError

# Names the view-generation algorithm; part of the digest, so a cache made by another
# algorithm never passes for this one.
ALGORITHM = "splitmix64-philox/1"
NONE = ("", "none")  # the spellings of "no augmentation"

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Param:
    """One parameter of a kind: its type, default (None: required) and bounds."""

    kind: type  # int | float
    default: int | float | None
    ok: Callable[[float], bool]
    bounds: str  # e.g. ">= 1", said in errors

    def parse(self, raw: str, what: str, text: str, where: str) -> int | float:
        """`raw` as this parameter's type, within its bounds; `what` names it in the error
        (e.g. "crop pad"), with the option `where` and the whole spec `text`."""
        try:
            value = self.kind(raw)
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise PipelineError(f"{where} {text!r}: {what} {raw} is out of range (float32)")
        if value is None or not math.isfinite(value) or not self.ok(value):
            number = "an integer" if self.kind is int else "a number"
            raise PipelineError(
                f"{where} {text!r}: {what} must be {number} {self.bounds}, got {raw!r}"
            )
        return value


@dataclass(frozen=True)
class Kind:
    """An augmentation kind: its parameters and the input ranks (ndim) it applies to."""

    params: dict[str, Param]
    ranks: tuple[int, ...] | None  # None: any input
    what: str  # the inputs it is for, said in errors


IMAGES = "(C, H, W) images"
KINDS: dict[str, Kind] = {
    "crop": Kind({"pad": Param(int, 4, lambda v: v >= 1, ">= 1")}, (3,), IMAGES),
    "flip": Kind({"p": Param(float, 0.5, lambda v: 0 < v <= 1, "in (0, 1]")}, (3,), IMAGES),
    "shift": Kind(
        {"max": Param(int, None, lambda v: v >= 1, ">= 1")},
        (1, 2, 3),
        "(L,) or (C, L) signals and (C, H, W) images",
    ),
    "noise": Kind({"std": Param(float, None, lambda v: v > 0, "> 0")}, None, "any input"),
}


@dataclass(frozen=True)
class Step:
    """One augmentation step: a kind and every one of its parameters (defaults filled in)."""

    kind: str
    params: tuple[tuple[str, int | float], ...]

    def __getitem__(self, key: str) -> int | float:
        return dict(self.params)[key]

    def __str__(self) -> str:
        return self.kind + "".join(f":{k}={v!r}" for k, v in self.params)


@dataclass(frozen=True)
class AugmentSpec:
    """An augmentation: steps applied in order; no steps is the identity (falsy)."""

    steps: tuple[Step, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def canonical(self) -> str:
        """Every step with every parameter, e.g. "crop:pad=4,flip:p=0.5" ("" for none)."""
        return ",".join(map(str, self.steps))

    @classmethod
    def parse(cls, text: str, where: str = "--augment") -> AugmentSpec:
        """`text` in the module's grammar; `where` names the option or key in errors."""
        if text.strip().lower() in NONE:
            return cls()
        steps: list[Step] = []
        for part in text.split(","):
            step = _parse_step(part.strip(), text, where)
            if any(s.kind == step.kind for s in steps):
                raise PipelineError(f"{where} {text!r}: {step.kind} given twice")
            steps.append(step)
        return cls(tuple(steps))

    def check_shape(self, shape: tuple[int, ...], where: str = "--augment") -> None:
        """Refuse a step that cannot apply to inputs of `shape` (one sample, e.g. (3, 32, 32))."""
        shape = tuple(int(d) for d in shape)
        for step in self.steps:
            kind = KINDS[step.kind]
            if kind.ranks is not None and len(shape) not in kind.ranks:
                raise PipelineError(
                    f"{where} {self.canonical!r}: {step.kind} applies to {kind.what}, "
                    f"not to inputs of shape {shape}"
                )
            reach = {"crop": "pad", "shift": "max"}.get(step.kind)
            spatial = shape[-_spatial_axes(shape) :] if reach else ()
            if reach and step[reach] >= min(spatial):
                raise PipelineError(
                    f"{where} {self.canonical!r}: {step.kind} {reach}={step[reach]} must be "
                    f"less than the spatial size {min(spatial)} of inputs of shape {shape}"
                )


def parse_augment(text: str, where: str = "--augment") -> AugmentSpec:
    """`AugmentSpec.parse`: the spec written in `text` ("" or "none": no augmentation)."""
    return AugmentSpec.parse(text, where)


def _parse_step(part: str, text: str, where: str) -> Step:
    """One STEP of the grammar: KIND(:KEY=VALUE)*."""
    name, *given = part.split(":")
    name = name.strip().lower()
    if name not in KINDS:
        raise PipelineError(
            f"{where} {text!r}: unknown augmentation {name!r} (known: {', '.join(KINDS)})"
        )
    kind, values = KINDS[name], {}
    for item in given:
        key, eq, raw = (s.strip() for s in item.partition("="))
        if key not in kind.params:
            known = ", ".join(kind.params) or "none"
            raise PipelineError(
                f"{where} {text!r}: {name} has no parameter {key!r} (known: {known})"
            )
        if not eq or key in values:
            raise PipelineError(f"{where} {text!r}: expected {name}:{key}=VALUE once, got {part!r}")
        values[key] = kind.params[key].parse(raw, f"{name} {key}", text, where)
    params = []
    for key, param in kind.params.items():
        if key not in values and param.default is None:
            raise PipelineError(f"{where} {text!r}: {name} needs {key}= (e.g. {name}:{key}=2)")
        params.append((key, values.get(key, param.default)))
    return Step(name, tuple(params))


def spec_digest(spec: AugmentSpec) -> str:
    """Short sha256 (16 hex digits) of the canonical spec and the algorithm, for provenance."""
    text = f"{ALGORITHM}\n{spec.canonical}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer, vectorised.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix(z: np.ndarray) -> np.ndarray:
    """uint64 array -> uint64 array, every bit of the input reaching every bit of the output."""
    with np.errstate(over="ignore"):
        z = z + _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def view_seeds(seed: int, sample_ids: np.ndarray, views: int) -> np.ndarray:
    """Seed of view v of each sample: mix(mix(mix(seed) ^ id) ^ v), a function of (seed,
    sample id, v) alone, never of the row, batch, worker, rank or epoch.  # (N, V) int64"""
    if views < 1:
        raise PipelineError(f"views must be >= 1, got {views}")
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64).view(np.uint64)  # (N,)
    base = splitmix(np.array([int(seed) & _U64], np.uint64))  # (1,)
    per_id = splitmix(base ^ ids)  # (N,)
    out = splitmix(per_id[:, None] ^ np.arange(views, dtype=np.uint64)[None, :])  # (N, V)
    return out.view(np.int64)


class _RowGenerators:
    """`Generator(Philox(key=seed))` for one row at a time: one Philox whose state is reset
    per row (~5 us) instead of a new one (~60 us), the same draws either way."""

    def __init__(self) -> None:
        self._bits = np.random.Philox(key=0)
        self.generator = np.random.Generator(self._bits)
        self._zeros = np.zeros(4, np.uint64)

    def reset(self, seed: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {"counter": self._zeros, "key": np.array([int(seed) & _U64, 0], np.uint64)},
            "buffer": self._zeros,
            "buffer_pos": 4,  # empty: the next draw starts at counter 0, as a new Philox does
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self.generator


def row_generator(seed: int) -> np.random.Generator:
    """The generator a view with `seed` draws from (what `apply_views` uses per row)."""
    return np.random.Generator(np.random.Philox(key=int(seed) & _U64))


def apply_views(inputs: np.ndarray, seeds: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """Each row of `inputs` (B, *shape) transformed by `spec` with randomness from its own
    seed alone: the same (row, seed) gives the same bytes in any batch.  # (B, *shape) float32"""
    x = np.asarray(inputs, dtype=np.float32)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} seeds for {len(x)} rows")
    spec.check_shape(x.shape[1:])
    if not spec or not len(x):
        return x.copy()
    rows = _RowGenerators()
    draws: list[list[Any]] = [[] for _ in spec.steps]  # step -> the draw of each row
    for seed in seeds.tolist():
        g = rows.reset(seed)
        for s, step in enumerate(spec.steps):  # each row draws for its steps in order
            draws[s].append(_DRAW[step.kind](g, step, x.shape[1:]))
    out = x
    with np.errstate(over="ignore", invalid="ignore"):  # said below, in one line
        for step, drawn in zip(spec.steps, draws, strict=True):
            out = _APPLY[step.kind](out, drawn, step)
    assert out.shape == x.shape and out.dtype == np.float32, (step.kind, out.shape, x.shape)
    if np.isfinite(x).all() and not np.isfinite(out).all():
        raise PipelineError(
            f"augmentation {spec.canonical!r} overflows float32 on these inputs (a view holds "
            "Inf or NaN): lower the step's size (e.g. noise:std)"
        )
    return out


def _spatial_axes(shape: tuple[int, ...]) -> int:
    """How many trailing axes of a sample are spatial: (L,) 1, (C, L) 1, (C, H, W) 2."""
    return 2 if len(shape) == 3 else 1


def _draw_shift(g: np.random.Generator, step: Step, shape: tuple[int, ...]) -> np.ndarray:
    """An integer offset in -reach..reach per spatial axis (`random` is exact, and ~15x
    cheaper than `integers` per call).  # (k,) int64"""
    reach = int(step["pad"] if step.kind == "crop" else step["max"])
    u = g.random(_spatial_axes(shape))
    return np.floor(u * (2 * reach + 1)).astype(np.int64) - reach


def _draw_flip(g: np.random.Generator, step: Step, shape: tuple[int, ...]) -> bool:
    return bool(g.random() < step["p"])


def _draw_noise(g: np.random.Generator, step: Step, shape: tuple[int, ...]) -> np.ndarray:
    return g.standard_normal(shape, dtype=np.float32)  # (*shape)


def _translate(x: np.ndarray, drawn: list[np.ndarray], step: Step) -> np.ndarray:
    """out[b, ..., t] = x[b, ..., t - offset[b]] along each spatial axis, 0 outside (a copy of
    the overlapping window per row: cheaper than padding and gathering the whole batch)."""
    out = np.zeros_like(x)
    k = len(drawn[0]) if drawn else 0
    sizes = x.shape[x.ndim - k :]
    for b, offsets in enumerate(drawn):
        dst, src = [], []
        for o, n in zip(offsets.tolist(), sizes, strict=True):
            dst.append(slice(max(o, 0), n + min(o, 0)))
            src.append(slice(max(-o, 0), n - max(o, 0)))
        out[(b, ..., *dst)] = x[(b, ..., *src)]
    return out


def _flip(x: np.ndarray, drawn: list[bool], step: Step) -> np.ndarray:
    mask = np.array(drawn, bool).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.where(mask, x[..., ::-1], x)  # mirror the last (W) axis where drawn


def _noise(x: np.ndarray, drawn: list[np.ndarray], step: Step) -> np.ndarray:
    return x + np.stack(drawn) * np.float32(step["std"])  # float32 throughout, elementwise


_DRAW = {"crop": _draw_shift, "shift": _draw_shift, "flip": _draw_flip, "noise": _draw_noise}
_APPLY = {"crop": _translate, "shift": _translate, "flip": _flip, "noise": _noise}


@dataclass(frozen=True)
class Views:
    """V views per sample under `spec`, seeded by `seed`: what stage one computes the teacher
    on and records, and what stage two regenerates from the stored seeds."""

    spec: AugmentSpec
    count: int = 1
    seed: int = 0

    def seeds(self, sample_ids: np.ndarray) -> np.ndarray:  # (n, V) int64
        return view_seeds(self.seed, sample_ids, self.count)

    def inputs(self, x: np.ndarray, sample_ids: np.ndarray) -> Iterator[np.ndarray]:
        """Each view's inputs (B, *shape), view 0 first; `x` itself without augmentation."""
        if not self.spec:
            yield from (x for _ in range(self.count))
            return
        seeds = self.seeds(sample_ids)  # (B, V)
        for v in range(self.count):
            yield apply_views(x, seeds[:, v], self.spec)

    def record(self) -> dict[str, Any]:
        """The cache's `views` attribute (V itself is the `num_views` attribute)."""
        return {
            "augment": self.spec.canonical,
            "augment_sha256": spec_digest(self.spec),
            "seed": self.seed,
            "algorithm": ALGORITHM,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Views:
        """The views a cache was computed on, from its attributes (none: 1 identity view)."""
        record = attrs.get("views") or {}
        if record and record.get("algorithm") != ALGORITHM:
            raise PipelineError(
                f"cache views made by {record.get('algorithm')!r}; this version makes {ALGORITHM}"
            )
        spec = AugmentSpec.parse(record.get("augment", ""), "cache attribute views.augment")
        recorded = record.get("augment_sha256")
        if recorded is not None and recorded != spec_digest(spec):  # re-derived, compared
            raise PipelineError(
                f"cache attribute views.augment {spec.canonical!r} is not the spec its digest "
                f"{recorded!r} records: an edited attribute"
            )
        return cls(spec, int(attrs.get("num_views", 1)), int(record.get("seed", 0)))
