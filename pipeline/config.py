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

    format: str = "auto"  # auto: hdf5 for a .h5/.hdf5 path, zarr otherwise
    dtype: str = "float32"
    compression: str = "zstd:3"
    chunk_rows: int = 0  # 0: chosen so a chunk holds about 2 MiB
    chunks_per_shard: int = 16
    batch_size: int = 256
    combine: str = "mean-logits"
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainStudentConfig:
    """`train_student` section (shared by all students) overlaid by `students.<name>`."""

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    labeled_fraction: float = 1.0
    cross_modal: bool = False  # join to the cache by sample ids alone (no fingerprint check)
    seed: int = 0
    device: str = "auto"


@dataclass
class EvaluateConfig:
    """`evaluate` section: score a student against the test split and its cache."""

    batch_size: int = 512
    cross_modal: bool = False
    device: str = "auto"


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
