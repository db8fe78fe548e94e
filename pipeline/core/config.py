"""Stage configs: defaults → a `params.yaml` section → explicit CLI options.

Each stage has one dataclass. `resolve()` layers the sources and validates every key and
type, so a typo in `params.yaml` is an error that names the key instead of a silent default.
Paths are not config: they live on the command line and in `dvc.yaml`, as in DVC's examples.
Every resolved config remembers where each value came from (`source`), and is validated once,
right after it is resolved, so an error names the key or option the user wrote.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.errors import PipelineError

FLOAT32_MAX = 3.4028234663852886e38  # torch and numpy compute settings in float32

C = TypeVar("C")

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
# A field with this metadata is filled by resolution, never given in a layer.
RESOLVED = {"resolved": True}
SEED = {"range": (0, 2**63 - 1)}  # torch takes seeds up to 2**64; numpy and JSON fewer
AT_LEAST_1 = {"range": (1, math.inf)}
AT_LEAST_0 = {"range": (0, math.inf)}


@dataclass
class Config:
    """Base of the stage configs: where each value came from, and validation."""

    def __post_init__(self) -> None:
        self._sources: dict[str, str] = {}

    def source(self, key: str) -> str:
        """Where `key` was set (``--lr``, ``params.yaml:train_student.lr``), else its name."""
        return self._sources.get(key, key)

    def validate(self) -> None:
        """Refuse impossible values, naming their source; called once by `resolve` (and by a
        library entry point given a config built in code). Subclasses extend it."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "range" in f.metadata and isinstance(value, (int, float)):
                low, high = f.metadata["range"]
                if not low <= value <= high:
                    bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
                    raise PipelineError(f"{self.source(f.name)} must be {bounds}, got {value!r}")


@dataclass
class OptimConfig(Config):
    """Optimizer and learning-rate schedule: one definition for teachers and students."""

    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (per step, to 0) | step | constant
    milestones: list[int] = field(default_factory=list)  # step: epochs where lr *= lr_decay
    lr_decay: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    # fp32 | bf16 | fp16: autocast for the forward pass and loss (fp16 with a gradient scaler)
    precision: str = "fp32"
    # CPU threads for torch; 0: 1 for small models, else every core but one
    # (pipeline.core.device.choose_threads). The count can change the last bits of the weights.
    threads: int = field(default=0, metadata=AT_LEAST_0)

    def validate(self) -> None:
        super().validate()
        choice(self, "optimizer", OPTIMIZERS)
        choice(self, "precision", PRECISIONS)
        choice(self, "schedule", SCHEDULES)
        require(self, "lr", self.lr > 0, "> 0")
        require(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        require(self, "momentum", 0 <= self.momentum < 1, "in [0, 1)")
        require(self, "lr_decay", 0 < self.lr_decay <= 1, "in (0, 1]")
        require(self, "epochs", self.epochs >= 1, ">= 1")
        require(self, "batch_size", self.batch_size >= 1, ">= 1")
        if self.milestones and self.schedule != "step":
            raise PipelineError(
                f"{self.source('milestones')} {self.milestones}: milestones apply to the step "
                f"schedule only, and {self.source('schedule')} is {self.schedule!r}"
            )
        bad = [m for m in self.milestones if not 0 < m < self.epochs]
        if bad:
            raise PipelineError(
                f"{self.source('milestones')} {bad}: each must be an epoch in "
                f"1..{self.epochs - 1} (training runs {self.epochs} epochs)"
            )


@dataclass
class TrainTeacherConfig(OptimConfig):
    """`train_teacher` section: fit a teacher on a labelled split."""

    model: str = "cnn"  # a registry model, or package.module:function
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = field(default=0, metadata=SEED)
    device: str = "auto"

    def validate(self) -> None:
        super().validate()
        require_model(self)


@dataclass
class PrecomputeConfig(Config):
    """`precompute_logits` section: run the teacher(s) once and store raw logits."""

    # Teacher sources (checkpoint, TorchScript, .onnx, pkg.mod:fn[@weights]), used when no
    # --teacher is given; several make an ensemble.
    teachers: list[str] = field(default_factory=list)
    format: str = "auto"  # auto: hdf5 for a .h5/.hdf5 path, zarr otherwise
    dtype: str = "float32"  # float32 | float16 | bfloat16 (stored as raw 16-bit words)
    # auto: zstd:3 for Zarr, gzip:4 for HDF5 (opens without plugins) | zstd:L | gzip:L | none
    compression: str = "auto"
    # 0: a power of two, about 2 MiB of logits (README)
    chunk_rows: int = field(default=0, metadata=AT_LEAST_0)
    # 0: up to 16 chunks and 16384 rows; the unit of crash-resume
    chunks_per_shard: int = field(default=0, metadata=AT_LEAST_0)
    batch_size: int = field(default=256, metadata=AT_LEAST_1)
    combine: str = "mean-logits"  # mean-logits | mean-probs (at T = 1)
    keep_members: bool = False  # also store members/logits (M, N, V, C)
    # Views per sample (V): the teachers run on each, logits (N, V, C); > 1 needs `augment`.
    views: int = field(default=1, metadata=AT_LEAST_1)
    # The views' augmentation, e.g. "crop:pad=4,flip" (grammar: pipeline/data/views.py);
    # "" or "none": the raw inputs.
    augment: str = ""
    seed: int = field(default=0, metadata=SEED)  # with each sample id, seeds its views
    device: str = "auto"
    # Feature targets, NAME=LAYER:KIND each, e.g. "att3=layers.2:attention" (grammar:
    # pipeline/cache/features.py); stored per view as features/NAME.
    features: list[str] = field(default_factory=list)
    # Sparse targets (pipeline/cache/sparse.py), in place of the full logits: the K largest raw
    # logits per view with their classes and the exact log-sum-exp; 0: full logits.
    topk: int = field(default=0, metadata=AT_LEAST_0)
    # Sampled targets (Anshumann et al. 2025): K classes drawn per view from the teacher's
    # distribution at T = 1, seeded by (seed, sample id), stored as classes and counts; 0: off.
    sample_k: int = field(default=0, metadata=AT_LEAST_0)
    # With sample_k: also store the drawn classes' raw logits (training at T != 1 needs them).
    sample_values: bool = False
    # fp32 | bf16 | fp16: autocast for torch teachers' forward passes (fp32: exact)
    precision: str = "fp32"
    # CPU threads for the teachers; 0: the rule of pipeline.core.device.choose_threads. Not
    # recorded in the cache's params: it is in the run record (OUT.run.json).
    threads: int = field(default=0, metadata=AT_LEAST_0)

    def validate(self) -> None:
        super().validate()
        choice(self, "precision", PRECISIONS)


@dataclass
class SweepConfig(Config):
    """`sweep` section: students × losses × temperatures, for the DVC matrix and
    `pipeline train-students` (plus a CE baseline per student)."""

    students: list[str] = field(default_factory=lambda: ["mlp"])  # keys of `students`
    losses: list[str] = field(default_factory=lambda: ["kd"])
    temperatures: list[float] = field(default_factory=lambda: [4.0])
    # Under torchrun: students (rank r trains students r, r + N, ... alone) | batches (every
    # student on all ranks, DDP); pipeline/core/distributed.py says what each guarantees.
    spread: str = "students"
    SPREADS: typing.ClassVar[tuple[str, ...]] = ("students", "batches")

    def validate(self) -> None:
        super().validate()
        choice(self, "spread", self.SPREADS)


@dataclass
class EvaluateConfig(Config):
    """`evaluate` section: score a student against the test split and its cache."""

    batch_size: int = field(default=512, metadata=AT_LEAST_1)
    cross_modal: bool = False
    other_teacher: bool = False  # allow a test cache made by another teacher than the train one
    ece_bins: int = field(default=15, metadata=AT_LEAST_1)
    # Timed CPU runs per batch size (1 and 256); 0 skips latency.
    latency_runs: int = field(default=20, metadata=AT_LEAST_0)
    # CPU threads while timing (1: comparable across machines).
    latency_threads: int = field(default=1, metadata=AT_LEAST_0)
    # CPU threads for the student's predictions; 0: the rule of pipeline.core.device.choose_threads
    threads: int = field(default=0, metadata=AT_LEAST_0)
    device: str = "auto"
    # The student's own factory, package.module:function, when it was trained from one: a
    # student directory names its model but never runs code; the user names the code to run.
    model: str = ""

    def validate(self) -> None:
        super().validate()
        require_code(self)


@dataclass
class ExportConfig(Config):
    """`export` section: a student to TorchScript or ONNX, checked against PyTorch."""

    format: str = "auto"  # auto (.onnx → onnx, else torchscript) | torchscript | onnx
    check_rows: int = field(default=8, metadata=AT_LEAST_1)  # inputs the export must reproduce
    rtol: float = 1e-4
    atol: float = 1e-5
    opset: int = 18  # ONNX only
    model: str = ""  # the student's own factory, as in `evaluate`

    def validate(self) -> None:
        super().validate()
        require_code(self)


# The sections a params file may hold; a misspelt one must not silently fall back to defaults.
SECTIONS = (
    "train_teacher",
    "precompute_logits",
    "train_student",
    "students",
    "losses",
    "sweep",
    "evaluate",
    "export",
)


def load_params(path: str | Path | None) -> dict[str, Any]:
    """Read a params.yaml file into a dict; None gives {}. Unknown sections are errors."""
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"params file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise PipelineError(f"{p}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as e:
        raise PipelineError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{p}: expected a mapping of sections at the top level")
    unknown = [str(k) for k in data if k not in SECTIONS]
    if unknown:
        raise PipelineError(
            f"{p}: unknown section '{unknown[0]}' (valid sections: {', '.join(SECTIONS)})"
        )
    return data


def _yaml_problem(e: Exception) -> str:
    """What a YAML parser error says, with the line and column where it found the problem."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    what = f"{problem} {context}" if context else problem
    return what if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def section(params: dict[str, Any], name: str, where: str = "params.yaml") -> dict[str, Any]:
    """One section of a params dict; missing means empty, a non-mapping is an error.
    `where` is the file, or the file and the enclosing keys (``params.yaml:losses``)."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        what = f"{where}.{name}" if ":" in where else f"{where}: section '{name}'"
        raise PipelineError(f"{what} must be a mapping")
    return value


def resolve(cls: type[C], *layers: tuple[str, dict[str, Any]], validate: bool = True) -> C:
    """Build `cls` from its defaults overlaid by each (where, values) layer in order, then
    validate it. `where` names the layer in errors, e.g. ``params.yaml:train_student``, or
    ``command line`` (whose keys are named as options, ``--lr``)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("resolved")}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for where, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                hint = getattr(cls, "UNKNOWN_KEY_HINT", "")
                raise PipelineError(
                    f"{where}: unknown key '{key}' (valid keys: {', '.join(fields)}){hint}"
                )
            sources[key] = _where(where, key, getattr(cls, "OPTIONS", {}))
            values[key] = _check_type(value, hints[key], sources[key])
    cfg = cls(**values)
    cfg._sources = sources
    if validate:
        cfg.validate()
    return cfg


def _where(layer: str, key: str, options: dict[str, str]) -> str:
    """A value's source: its option on the command line (``--lr``), else ``LAYER.KEY``."""
    if layer == "command line":
        return options.get(key, f"--{key.replace('_', '-')}")
    return f"{layer}.{key}"


def layered(
    cls: type[C],
    values: dict[str, Any],
    params: str | None,
    section_name: str,
    cli: dict[str, Any],
    extra: list[tuple[str, dict[str, Any]]] = (),
) -> C:
    """Config `cls`: defaults, then section `section_name` of `values` (the params file
    `params`, already loaded), then the `extra` layers, then the command-line options `cli`."""
    where = params or "params.yaml"
    layers = [(f"{where}:{section_name}", section(values, section_name, where))]
    return resolve(cls, *layers, *extra, ("command line", cli))


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data, for saving beside an artifact."""
    return dataclasses.asdict(cfg)


def require(cfg: Config, key: str, ok: bool, bounds: str) -> None:
    if not ok:
        raise PipelineError(f"{cfg.source(key)} must be {bounds}, got {getattr(cfg, key)!r}")


def choice(cfg: Config, key: str, options: tuple[str, ...]) -> None:
    value = getattr(cfg, key)
    if value not in options:
        raise PipelineError(f"{cfg.source(key)} {value!r}: expected one of {', '.join(options)}")


def require_model(cfg: Config) -> None:
    """`cfg.model` names a registered model, a `package.module:function` factory or a
    Hugging Face model directory (a config.json in it)."""
    from pathlib import Path

    from pipeline.core.usercode import is_reference
    from pipeline.models import list_models

    folder = Path(cfg.model).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        return
    if cfg.model not in list_models() and not is_reference(cfg.model):
        raise PipelineError(
            f"{cfg.source('model')}: unknown model '{cfg.model}' (valid: "
            f"{', '.join(list_models())}, package.module:function, or a Hugging Face model "
            "directory)"
        )


def require_code(cfg: Config) -> None:
    """`cfg.model`, the code the user trusts a student directory to name, is empty or a
    `package.module:function` (a registry model is rebuilt without being named)."""
    from pipeline.core.usercode import is_reference

    if cfg.model and not is_reference(cfg.model):
        raise PipelineError(
            f"{cfg.source('model')} {cfg.model!r}: expected package.module:function, the "
            "student's own factory (a registry model needs none)"
        )


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except PipelineError:
                pass
        raise PipelineError(f"{where}: expected {_name(hint)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise PipelineError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise PipelineError(f"{where}: expected a finite number, got {value!r}")
        if abs(value) > FLOAT32_MAX:  # torch computes in float32: it would overflow there
            raise PipelineError(f"{where}: {value!r} is out of range (at most ±3.4e38, float32)")
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise PipelineError(f"{where}: expected {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise PipelineError(f"{where}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
