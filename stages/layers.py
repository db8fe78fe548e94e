"""Stage-less command: list a teacher's layers (module paths), their types and output shapes,
so `--features NAME=LAYER:KIND` can name one (`pipeline.teacher.features.layer_table` does the
work)."""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.teacher.features import layer_table
from pipeline.teacher.precompute import PROBE_ROWS
from pipeline.teacher.teachers import load_teachers


def run(teacher: str, data: str = "digits:train") -> list[dict[str, Any]]:
    """The layers of `teacher` (any --teacher form with torch modules), run once on the first
    rows of `data`: [{"path", "type", "shape" (per sample; None: did not run), "calls"}], the
    input first."""
    ts = load_transfer_set(data, lazy=True)
    if len(ts) == 0:
        raise PipelineError(f"--data {data}: no samples")
    probe = ts.inputs[:PROBE_ROWS]
    (loaded,) = load_teachers([teacher], probe)
    return layer_table(loaded, probe)
