"""The student directory written by train-student and read by evaluate and export."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError

CHECKPOINT = "student.pt"  # weights + everything needed to rebuild the model
LOG = "train_log.csv"  # one row per epoch
INFO = "student.json"  # the checkpoint's metadata, readable without torch


def checkpoint_of(student: Path) -> Path:
    """The checkpoint inside a student directory written by train-student."""
    ckpt = Path(student) / CHECKPOINT
    if not ckpt.is_file():
        raise PipelineError(f"--student {student}: no {CHECKPOINT} in it (train-student output?)")
    return ckpt
