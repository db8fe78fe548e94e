"""Distillation losses. Every loss takes raw logits, so one cache serves every temperature.

Shapes: student and teacher logits (B, C); labels (B,) int64 with -1 where unknown.
Each loss is checked against a hand-written reference formula in tests/test_losses.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError


def labelled_ce(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled rows only; 0 when a batch has none."""
    known = labels >= 0
    if not known.any():
        return student.sum() * 0.0  # keeps the graph (and the device) without a NaN
    return F.cross_entropy(student[known], labels[known])


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch.

    The T² keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton KD: (1-a)·CE(y, s) + a·T²·KL(softmax(t/T) ‖ softmax(s/T))."""
    loss = alpha * soft_kl(student, teacher, temperature)
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * labelled_ce(student, labels)
    return loss


def ce_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The no-distillation baseline: labels only, teacher ignored."""
    return labelled_ce(student, labels)


LossFn = Callable[..., torch.Tensor]

LOSSES: dict[str, LossFn] = {"kd": kd_loss, "ce": ce_loss}

# Losses that never look at the teacher: their students need no cache rows.
TEACHER_FREE = {"ce"}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise PipelineError(f"unknown loss '{name}' (valid: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]
