"""Stage: a sweep of students in one process, from one loaded cache and one data pipeline
(`pipeline.sweep` plans it from params.yaml; `pipeline.distill` trains it)."""

from __future__ import annotations

from pathlib import Path

from pipeline.distill import train
from pipeline.students import Student


def run(
    students: list[Student],
    cache: Path,
    data: str,
    overwrite: bool = False,
    resume: bool = False,
) -> list[Path]:
    """Train every student of the sweep; returns their directories.

    With `resume`, students whose directory exists are done and skipped, the rest continue
    from their per-epoch checkpoints.
    """
    todo = [s for s in students if not (resume and not overwrite and s.out.exists())]
    if todo:
        train(todo, cache, data, overwrite=overwrite, resume=resume, out_option="--out-dir student")
    return [s.out for s in students]
