"""Loading teachers for stage one, and the provenance each one leaves in the cache.

A teacher is anything that maps a float32 batch (B, *input_shape) to logits (B, C). Every
member is run once on the first batch of the transfer set before the long run starts, so a
wrong input shape or class count fails in seconds with a message naming the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import PipelineError
from pipeline.fsutil import sha256_file


@dataclass
class Teacher:
    """A loaded ensemble member and where it came from."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # (B, *input_shape) → (B, C)
    source: str
    sha256: str
    name: str
    num_classes: int | None = None  # None: learnt from the probe batch
    class_names: list[str] | None = None
    input_shape: tuple[int, ...] | None = None
    num_params: int | None = None
    module: torch.nn.Module | None = field(default=None, repr=False)

    def to(self, device: torch.device) -> Teacher:
        if self.module is not None:
            self.module.to(device).eval()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "num_params": self.num_params,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "num_classes": self.num_classes,
        }


def load_teacher(source: str) -> Teacher:
    """One teacher from a `pipeline train-teacher` checkpoint path."""
    model, meta = load_checkpoint(source)
    return Teacher(
        forward=model,
        source=source,
        sha256=sha256_file(source),
        name=meta["model"],
        num_classes=int(meta["num_classes"]),
        class_names=meta.get("class_names"),
        input_shape=tuple(meta["input_shape"]) if meta.get("input_shape") else None,
        num_params=meta.get("num_params"),
        module=model,
    )


def load_teachers(sources: list[str], probe: np.ndarray) -> list[Teacher]:
    """Load every ensemble member and run each on `probe` (B, *input_shape).

    All members must accept the inputs and agree on class count and class names.
    """
    if not sources:
        raise PipelineError("give at least one --teacher")
    teachers = [load_teacher(src) for src in sources]
    for t in teachers:
        _probe(t, probe)
    first = teachers[0]
    for t in teachers[1:]:
        if t.num_classes != first.num_classes:
            raise PipelineError(
                f"--teacher {t.source} has {t.num_classes} classes but {first.source} has "
                f"{first.num_classes}; ensemble members must agree"
            )
        if t.class_names and first.class_names and t.class_names != first.class_names:
            raise PipelineError(f"--teacher {t.source}: class names differ from {first.source}'s")
    return teachers


def _probe(t: Teacher, probe: np.ndarray) -> None:
    """Run `t` on the first batch: check the input shape it expects and the output it gives."""
    got = tuple(probe.shape[1:])
    if t.input_shape is not None and tuple(t.input_shape) != got:
        raise PipelineError(
            f"--teacher {t.source} expects inputs of shape {tuple(t.input_shape)}, "
            f"the data has {got}"
        )
    try:
        with torch.inference_mode():
            out = t(torch.from_numpy(np.ascontiguousarray(probe)))
    except Exception as e:  # a foreign model may raise anything on a bad shape
        expected = f" (expects {tuple(t.input_shape)})" if t.input_shape else ""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(
            f"--teacher {t.source} rejected inputs of shape {got}{expected}: {msg}"
        ) from None
    if out.ndim != 2 or out.shape[0] != len(probe):
        raise PipelineError(
            f"--teacher {t.source}: expected output (batch, classes), got {tuple(out.shape)}"
        )
    if t.num_classes is None:
        t.num_classes = int(out.shape[1])
    elif out.shape[1] != t.num_classes:
        raise PipelineError(
            f"--teacher {t.source}: outputs {out.shape[1]} classes, its checkpoint says "
            f"{t.num_classes}"
        )
