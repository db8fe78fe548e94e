"""Stage: check every section of params.yaml as the stages will read it, before any runs.

dvc.yaml lists this stage first. DVC runs stages that do not depend on one another in the
order of the file, and deletes a stage's outputs just before it runs it: so a typo in
params.yaml (`dvc exp run -S losses.dkd.beta=abc`) stops the run here, in one line naming the
key, with every artifact of the last good run still in place.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import (
    EvaluateConfig,
    ExportConfig,
    PrecomputeConfig,
    SweepConfig,
    TrainTeacherConfig,
    layered,
    load_params,
    section,
)
from pipeline.student.students import resolve_student
from pipeline.student.sweep import plan
from pipeline.teacher.precompute import check_config

STAGE_SECTIONS = {
    "train_teacher": TrainTeacherConfig,
    "precompute_logits": PrecomputeConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
}


def run(params: str) -> list[str]:
    """Resolve every stage's config from `params` (refusing, as the stages would, unknown
    keys, wrong types and values out of range); returns the sweep's student names."""
    values = load_params(params)
    for name, cls in STAGE_SECTIONS.items():
        cfg = layered(cls, values, params, name, {})
        if name == "precompute_logits":
            check_config(cfg)  # dtype, compression, combine, augment, sparse options
    sweep = layered(SweepConfig, values, params, "sweep", {})
    students = plan(values, params, sweep, {}, Path("students"))
    # Presets and loss entries the sweep leaves out are checked too: a typo there is still one.
    first_loss, first = sweep.losses[0], students[0].preset
    for preset in section(values, "students", params):
        resolve_student(values, params, preset, {"loss": first_loss})
    for loss in section(values, "losses", params):
        options = {"loss": loss} if first else {"loss": loss, "model": sweep.students[0]}
        resolve_student(values, params, first, options)
    return [s.out.name for s in students]
