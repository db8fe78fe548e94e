"""The evaluate result on disk: `metrics/X.json` holds numbers with stable names (what
`dvc metrics diff` and `dvc exp show` read), and its sidecar `metrics/X.info.json` holds what
they describe (the student, its loss and settings, the teacher, the data, the config)."""

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
    "size_bytes",
    "num_samples",
    "num_labelled",
)
INFO_SUFFIX = ".info.json"  # metrics/X.json → metrics/X.info.json


def info_path(metrics_file: Path) -> Path:
    """The sidecar beside a metrics file: what was evaluated, how, and against what."""
    return Path(metrics_file).with_name(Path(metrics_file).stem + INFO_SUFFIX)


def split_result(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """An evaluate result as (metrics: numbers only, info: everything else). Unmeasured
    numbers (accuracy without labels, latency when skipped) are left out, not null."""
    numbers = {k: result[k] for k in METRIC_KEYS if result.get(k) is not None}
    for batch, ms in (result.get("latency_ms_per_sample") or {}).items():
        numbers[f"latency_ms_at_{batch}"] = ms
    info = {k: v for k, v in result.items() if k not in numbers}
    return numbers, info


def join_result(numbers: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The evaluate result again, from a metrics file and its sidecar (`split_result`'s
    inverse, unmeasured numbers as None)."""
    result = {**info, **{k: numbers.get(k) for k in METRIC_KEYS}}
    latency = {k.rsplit("_", 1)[1]: v for k, v in numbers.items() if k.startswith("latency_ms_at_")}
    result["latency_ms_per_sample"] = latency or None
    return result
