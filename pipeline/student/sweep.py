"""A sweep of students: students × losses × temperatures (the `sweep` section of params.yaml,
the grid the DVC matrix runs), plus a CE baseline per student. Students are named as the DVC
matrix names their directories: STUDENT-LOSS-tT, and STUDENT-ce for the baseline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import SweepConfig, section
from pipeline.core.errors import PipelineError
from pipeline.student.students import Student, resolve_student


@dataclass(frozen=True)
class SweepItem:
    student: str  # a key of `students` in params.yaml, or a registry model name
    loss: str
    temperature: float | None  # None for the CE baseline

    @property
    def name(self) -> str:
        return student_name(self.student, self.loss, self.temperature)


def student_name(student: str, loss: str, temperature: float | None) -> str:
    """Directory name of a sweep student: mlp-kd-t4, mlp-dkd-t1.5, mlp-ce."""
    if temperature is None:
        return f"{student}-{loss}"
    return f"{student}-{loss}-t{temperature:g}"


def expand(sweep: SweepConfig, baseline: bool = True) -> list[SweepItem]:
    """Every (student, loss, temperature) of the sweep, then each student's CE baseline."""
    from pipeline.student.losses import get_loss

    if not sweep.students:
        raise PipelineError(f"{sweep.source('students')} is empty: nothing to train")
    for loss in sweep.losses:
        try:
            get_loss(loss)
        except PipelineError as e:
            raise PipelineError(f"{sweep.source('losses')}: {e}") from None
    if any(t <= 0 for t in sweep.temperatures):
        where = sweep.source("temperatures")
        raise PipelineError(f"{where} must all be > 0, got {sweep.temperatures}")
    items = [
        SweepItem(s, loss, None if loss == "ce" else t)
        for s in sweep.students
        for loss in sweep.losses
        for t in (sweep.temperatures if loss != "ce" else [None])
    ]
    if baseline:
        items += [SweepItem(s, "ce", None) for s in sweep.students]
    unique = list(dict.fromkeys(items))  # 'ce' in sweep.losses and the baseline coincide
    if not unique:
        raise PipelineError(
            f"the sweep is empty (losses: {sweep.losses}, temperatures: {sweep.temperatures})"
        )
    return unique


def require_model(name: str, presets: dict) -> None:
    """`name` must be a preset (a key of `students`) or a registered model."""
    from pipeline.models import list_models

    if name not in presets and name not in list_models():
        raise PipelineError(
            f"--students {name}: neither a key of `students` in --params "
            f"(have: {', '.join(presets) or 'none'}) nor a model ({', '.join(list_models())})"
        )


def plan(
    values: dict[str, Any],
    params: str | None,
    sweep: SweepConfig,
    common: dict[str, Any],
    out_dir: Path,
    baseline: bool = True,
) -> list[Student]:
    """The students of `sweep`, each configured as `train-student --name STUDENT --loss LOSS
    --temperature T` with the options `common` would be, from `values` (the params file
    `params`, already loaded). A sweep student that is not a key of `students` is a registry
    model name."""
    where = params or "params.yaml"
    presets = section(values, "students", where)
    students = []
    for item in expand(sweep, baseline):
        options = {**common, "loss": item.loss}
        if item.temperature is not None:
            options["temperature"] = item.temperature
        preset = item.student if item.student in presets else None
        if preset is None:
            require_model(item.student, presets)
            options["model"] = item.student
        cfg = resolve_student(values, params, preset, options)
        students.append(Student(cfg, Path(out_dir) / item.name, preset))
    return students
