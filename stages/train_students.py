"""Stage: a sweep of students in one process, from one loaded cache and one data pipeline
(`pipeline.student.sweep` plans it from params.yaml; `pipeline.student.distill` trains it). Under
torchrun, `spread` says how the ranks share the sweep (pipeline.core.distributed)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.config import as_dict
from pipeline.core.distributed import alone, from_env, spread_students
from pipeline.core.errors import PipelineError
from pipeline.student.distill import check_outputs, train
from pipeline.student.students import INFO, Student

OUT_OPTION = "--out-dir student"


def run(
    students: list[Student],
    cache: Path,
    data: str,
    overwrite: bool = False,
    resume: bool = False,
    spread: str = "students",
) -> list[Path]:
    """Train every student of the sweep; returns the directories this process reports: every
    student's in one process (and on rank 0 under `spread` batches), the rank's own students
    under `spread` students (on the other ranks of `batches`: none).

    With `resume`, students whose directory exists are done and skipped, the rest continue
    from their per-epoch checkpoints.
    """
    ranks = from_env()
    done = [s for s in students if s.out.exists()]
    if done and not (resume or overwrite):  # an interrupted sweep is continued, not retrained
        raise PipelineError(
            f"{done[0].out} already exists ({len(done)} of {len(students)} students are "
            "done): --resume skips finished students and continues the others, --overwrite "
            "retrains them all"
        )
    if resume and not overwrite:
        for s in done:
            _require_same_settings(s)
    if spread == "students" and ranks.active:
        check_outputs(students, cache, data, OUT_OPTION)  # the whole sweep, on every rank
        students, ranks = spread_students(students, ranks), alone(ranks)
    todo = [s for s in students if not (resume and not overwrite and s.out.exists())]
    if todo:
        train(todo, cache, data, overwrite, resume, out_option=OUT_OPTION, ranks=ranks)
    return [s.out for s in students] if ranks.main else []


def _require_same_settings(s: Student) -> None:
    """A finished student that --resume would skip was trained with the settings the sweep
    asks for now; another one is refused (it would silently stand for the new settings)."""
    try:
        trained = json.loads((s.out / INFO).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(f"{s.out}: no readable {INFO}: --overwrite retrains it") from None
    wanted = json.loads(json.dumps(as_dict(s.cfg)))
    changed = sorted(k for k in wanted if trained.get(k) != wanted[k])
    if changed:
        was = ", ".join(f"{k} {trained.get(k)!r} (now {wanted[k]!r})" for k in changed[:3])
        raise PipelineError(
            f"{s.out} was trained with other settings ({was}): --resume would keep it as "
            "it is; --overwrite retrains the sweep"
        )
