"""Stage: score a student on the test split against the cached teacher (teacher not loaded).

The metrics live in `pipeline.metrics`; this stage writes their result as metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import EvaluateConfig
from pipeline.fsutil import atomic_output, check_writable
from pipeline.metrics import evaluate_student


def run(
    cfg: EvaluateConfig,
    student: Path,
    cache: Path,
    data: str,
    out: Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `out` (metrics.json) for the student directory `student`."""
    check_writable(Path(out), overwrite)
    result = evaluate_student(cfg, student, cache, data)
    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result
