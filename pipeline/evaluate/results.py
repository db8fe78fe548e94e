"""The evaluate result on disk: `metrics/X.json` holds numbers with stable names (what
`dvc metrics diff` and `dvc exp show` read), its sidecar `metrics/X.info.json` what they
describe (the student, its loss and settings, the teacher, the data, the config), and the run
record `metrics/X.run.json` what was measured rather than computed (CPU latency, threads):
the first two are a function of their inputs, the run record is not (pipeline.core.runrecord)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRIC_KEYS = (
    "accuracy",
    "top5_accuracy",
    "agreement",
    "kl_teacher_student",
    "ece",
    "teacher_accuracy",
    "teacher_top5_accuracy",
    "teacher_ece",
    "num_params",
    "flops_per_sample",
    "size_bytes",
    "num_samples",
    "num_labelled",
)
INFO_SUFFIX = ".info.json"  # metrics/X.json → metrics/X.info.json
RUN_KEYS = ("latency_ms_per_sample", "latency_threads", "threads")  # in the run record


def info_path(metrics_file: Path) -> Path:
    """The sidecar beside a metrics file: what was evaluated, how, and against what."""
    return Path(metrics_file).with_name(Path(metrics_file).stem + INFO_SUFFIX)


def split_result(
    result: dict[str, Any],
) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """An evaluate result as (metrics: numbers only, info: what they describe, run: what was
    measured). Unmeasured numbers (accuracy without labels) are left out, not null."""
    numbers = {k: result[k] for k in METRIC_KEYS if result.get(k) is not None}
    run = {k: result[k] for k in RUN_KEYS if k in result}
    info = {k: v for k, v in result.items() if k not in numbers and k not in run}
    return numbers, info, run


def join_result(numbers: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The evaluate result again, from a metrics file and its sidecar (`split_result`'s
    inverse without the run record, unmeasured numbers as None)."""
    return {**info, **{k: numbers.get(k) for k in METRIC_KEYS}}
