"""Stage: train a student against cached teacher logits. The teacher is never loaded."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.store import location
from pipeline.data.sequences import is_sequence_spec
from pipeline.student.distill import train
from pipeline.student.students import Student, TrainStudentConfig


def run(
    cfg: TrainStudentConfig,
    cache: Path,
    data: str,
    out: Path,
    name: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Distil `cfg.model` from the cache at `cache` on `data`; write a student dir at `out`.

    `name` is the students.<name> preset the config came from (recorded only).
    """
    if is_sequence_spec(data):  # a language model, from a token cache
        from pipeline.student.lm import train_lm_student

        return train_lm_student(cfg, Path(cache), data, Path(out), overwrite, resume, name)
    (path,) = train([Student(cfg, Path(out), name)], location(cache), data, overwrite, resume)
    return path
