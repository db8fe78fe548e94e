"""Loading teachers for stage one, and the provenance each one leaves in the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file


@dataclass
class Teacher:
    """A loaded ensemble member and where it came from."""

    model: torch.nn.Module
    meta: dict[str, Any]
    source: str
    sha256: str

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.meta["model"],
            "source": self.source,
            "sha256": self.sha256,
            "num_params": self.meta.get("num_params"),
            "input_shape": self.meta.get("input_shape"),
        }


def load_teacher(source: str) -> Teacher:
    """One teacher from a `pipeline train-teacher` checkpoint path."""
    model, meta = load_checkpoint(source)
    return Teacher(model, meta, source, sha256_file(source))


def load_teachers(sources: list[str]) -> list[Teacher]:
    """Load every ensemble member; all must agree on class count and class names."""
    if not sources:
        raise PipelineError("give at least one --teacher")
    teachers = [load_teacher(src) for src in sources]
    first = teachers[0]
    for t in teachers[1:]:
        if t.num_classes != first.num_classes:
            raise PipelineError(
                f"--teacher {t.source} has {t.num_classes} classes but {first.source} has "
                f"{first.num_classes}; ensemble members must agree"
            )
        if t.meta.get("class_names") != first.meta.get("class_names"):
            raise PipelineError(f"--teacher {t.source}: class names differ from {first.source}'s")
    return teachers
