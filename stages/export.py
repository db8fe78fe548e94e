"""Stage: export a trained student to TorchScript or ONNX, checked equal to the PyTorch one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.core.config import ExportConfig, as_dict
from pipeline.core.fsutil import check_not_input
from pipeline.evaluate.export import export_model, format_for
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import checkpoint_of


def run(cfg: ExportConfig, student: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write the student directory `student` to `out`; returns the equality check. A student
    of the user's own factory is rebuilt only when `cfg.model` names it."""
    check_not_input(Path(out), {"--student": Path(student)})
    code_from = cfg.source("model")  # --model or params.yaml:export.model; replace forgets it
    cfg = dataclasses.replace(cfg, format=format_for(Path(out), cfg.format))  # as recorded
    ckpt = checkpoint_of(student)
    model, info = load_checkpoint(ckpt, cfg.model or None, code_from=code_from)
    meta = {**info, "export": as_dict(cfg)}  # travels inside the exported file
    return export_model(
        model,
        meta,
        Path(out),
        fmt=cfg.format,
        check_rows=cfg.check_rows,
        rtol=cfg.rtol,
        atol=cfg.atol,
        opset=cfg.opset,
        overwrite=overwrite,
    )
