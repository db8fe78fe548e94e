"""Stage: score a student on the test split against the cached teacher (teacher not loaded).

The metrics live in `pipeline.evaluate.metrics`; this stage writes their numbers to OUT
(metrics.json, what `dvc metrics` and `dvc exp show` read), what they describe to OUT's sidecar
(`X.info.json`: the student, its loss and settings, the teacher, the data, the config), and
what was measured (CPU latency, threads) to its run record (`X.run.json`, not hashed by DVC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.cache.store import location
from pipeline.core.config import EvaluateConfig
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import (
    atomic_output,
    check_not_input,
    check_writable,
    data_path,
    json_text,
)
from pipeline.core.runrecord import write_record
from pipeline.data.sequences import is_sequence_spec
from pipeline.evaluate.lm import evaluate_lm_student
from pipeline.evaluate.metrics import evaluate_student
from pipeline.evaluate.results import info_path, split_result
from pipeline.student.students import CHECKPOINT


def run(
    cfg: EvaluateConfig,
    student: Path,
    cache: Path,
    data: str,
    out: Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `out` (metrics.json) and its sidecar for the student directory `student`;
    returns the whole result."""
    if Path(student).is_file() and Path(student).name == CHECKPOINT:  # the file, not its folder
        student = Path(student).parent
    elif Path(student).is_file():  # a teacher's checkpoint, say: not "student.pt not found"
        raise PipelineError(
            f"--student {student}: a file; give a student directory (train-student's --out) "
            f"or the {CHECKPOINT} in it"
        )
    inputs = {"--student": Path(student), "--cache": location(cache), "--data": data_path(data)}
    for path in (Path(out), info_path(out)):
        check_not_input(path, inputs)
        check_writable(path, overwrite)
    if Path(out).suffix.lower() != ".json":  # the metrics file DVC and `dvc exp show` read
        raise PipelineError(f"--out {out}: expected a .json file (the metrics are JSON)")
    if is_sequence_spec(data):  # a language model: bits per token, agreement
        numbers, info = evaluate_lm_student(student, cache, data, cfg.device, cfg.threads,
                                            cfg.other_teacher)  # fmt: skip
        result, run = {**info, **numbers}, {}
    else:
        result = evaluate_student(cfg, student, cache, data)
        numbers, info, run = split_result(result)
    # The sidecar first: a metrics file is there only once both are.
    for path, content in ((info_path(out), info), (Path(out), numbers)):
        with atomic_output(path, overwrite) as tmp:
            tmp.write_text(json_text(content))
    write_record(out, {"command": "evaluate", **run}, identity=Path(out))
    return result
