"""Stage configs: defaults → a `params.yaml` section → explicit CLI options.

Each stage has one dataclass. `resolve()` layers the sources and validates every key and
type, so a typo in `params.yaml` is an error that names the key instead of a silent default.
Paths are not config: they live on the command line and in `dvc.yaml`, as in DVC's examples.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PipelineError

C = TypeVar("C")


@dataclass
class TrainTeacherConfig:
    """`train_teacher` section: fit a teacher on a labelled split."""

    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"


@dataclass
class PrecomputeConfig:
    """`precompute_logits` section: run the teacher(s) once and store raw logits."""

    # Teacher sources (checkpoint, TorchScript, .onnx, pkg.mod:fn[@weights]), used when no
    # --teacher is given; several make an ensemble.
    teachers: list[str] = field(default_factory=list)
    format: str = "auto"  # auto: hdf5 for a .h5/.hdf5 path, zarr otherwise
    dtype: str = "float32"  # float32 | float16 | bfloat16 (stored as raw 16-bit words)
    compression: str = "zstd:3"  # zstd:LEVEL | none
    chunk_rows: int = 0  # 0: a power of two, about 2 MiB of logits (README)
    chunks_per_shard: int = 0  # 0: up to 16 chunks and 16384 rows; the unit of crash-resume
    batch_size: int = 256
    combine: str = "mean-logits"  # mean-logits | mean-probs (at T = 1)
    keep_members: bool = False  # also store members/logits (M, N, V, C)
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainStudentConfig:
    """`train_student` section (shared by all students), overlaid by `students.<name>`, then
    by `losses.<loss>`."""

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "kd"  # kd | soft | mse | dkd | dist | ce (README: Losses)
    temperature: float = 4.0
    alpha: float | None = None  # loss weights; None: the loss's own default (README: Losses)
    beta: float | None = None
    gamma: float | None = None
    combine: str = "mean-logits"  # members of an ensemble cache: mean-logits | mean-probs at T
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (per step) | step | constant
    milestones: list[int] = field(default_factory=list)  # step: lr *= lr_decay after N epochs
    lr_decay: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    labeled_fraction: float = 1.0
    cross_modal: bool = False  # join to the cache by sample ids alone (no fingerprint check)
    cache_memory: int | str = "2GiB"  # targets up to this size in memory, else streamed
    threads: int = 0  # CPU threads for torch; 0: torch's default (one per core)
    seed: int = 0
    device: str = "auto"


@dataclass
class SweepConfig:
    """`sweep` section: students × losses × temperatures, for the DVC matrix and
    `pipeline train-students` (plus a CE baseline per student)."""

    students: list[str] = field(default_factory=lambda: ["mlp"])  # keys of `students`
    losses: list[str] = field(default_factory=lambda: ["kd"])
    temperatures: list[float] = field(default_factory=lambda: [4.0])


@dataclass
class EvaluateConfig:
    """`evaluate` section: score a student against the test split and its cache."""

    batch_size: int = 512
    cross_modal: bool = False
    ece_bins: int = 15
    latency_runs: int = 20  # timed CPU runs per batch size (1 and 256); 0 skips latency
    latency_threads: int = 1  # CPU threads while timing (1: comparable across machines)
    device: str = "auto"


@dataclass
class ExportConfig:
    """`export` section: a student to TorchScript or ONNX, checked against PyTorch."""

    format: str = "torchscript"  # torchscript | onnx
    check_rows: int = 8  # random inputs the exported model must reproduce
    rtol: float = 1e-4
    atol: float = 1e-5
    opset: int = 18  # ONNX only


def load_params(path: str | Path | None) -> dict[str, Any]:
    """Read a params.yaml file into a dict; None or a missing default gives {}."""
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"params file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{p}: expected a mapping of sections at the top level")
    return data


def section(params: dict[str, Any], name: str, where: str = "params.yaml") -> dict[str, Any]:
    """One section of a params dict; missing means empty, a non-mapping is an error."""
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise PipelineError(f"{where}: section '{name}' must be a mapping")
    return value


def resolve(cls: type[C], *layers: tuple[str, dict[str, Any]]) -> C:
    """Build `cls` from its defaults overlaid by each (where, values) layer in order.

    `where` names the layer in errors, e.g. ``params.yaml:train_student``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for where, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                valid = ", ".join(fields)
                raise PipelineError(f"{where}: unknown key '{key}' (valid keys: {valid})")
            values[key] = _check_type(value, hints[key], f"{where}.{key}")
    return cls(**values)


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


def resolve_student(
    values: dict[str, Any], params: str | None, preset: str | None, cli: dict[str, Any]
) -> TrainStudentConfig:
    """TrainStudentConfig: defaults → train_student → students.PRESET → losses.LOSS → options,
    from `values` (the params file `params`, already loaded). With a params file, a preset
    missing from its `students` is an error."""
    where = params or "params.yaml"
    extra = []
    if preset is not None and params is not None:
        students = section(values, "students", where)
        if preset not in students:
            raise PipelineError(
                f"--name {preset}: no students.{preset} in {where} "
                f"(have: {', '.join(students) or 'none'})"
            )
        extra.append((f"{where}:students.{preset}", section(students, preset, where)))
    cfg = layered(TrainStudentConfig, values, params, "train_student", cli, extra)
    losses = section(values, "losses", where)
    if cfg.loss in losses:  # per-loss settings (weights, epochs of the CE baseline...)
        extra.append((f"{where}:losses.{cfg.loss}", section(losses, cfg.loss, where)))
        cfg = layered(TrainStudentConfig, values, params, "train_student", cli, extra)
    return cfg


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data, for saving beside an artifact."""
    return dataclasses.asdict(cfg)


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
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise PipelineError(f"{where}: expected {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise PipelineError(f"{where}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
