"""Distillation losses. Every loss takes raw logits, so one cache serves every temperature.

Shapes: student and teacher logits (B, C); labels (B,) int64 with -1 where unknown.
Each loss is checked against a hand-written reference formula in tests/test_losses.py.

| name | formula (CE is over the labelled rows of the batch only) |
|---|---|
| kd   | (1-a)·CE + a·T²·KL(softmax(t/T) ‖ softmax(s/T))                  Hinton et al. 2015 |
| soft | T²·KL(softmax(t/T) ‖ softmax(s/T)); labels unused             unlabelled transfer sets |
| mse  | (1-a)·CE + a·mean((s - t)²); T cancels out of logit regression     Ba & Caruana 2014 |
| dkd  | CE + a·T²·TCKD + b·T²·NCKD                                          Zhao et al. 2022 |
| dist | CE + b·T²·(1 - inter-class ρ) + g·T²·(1 - intra-class ρ)            Huang et al. 2022 |
| ce   | CE; the teacher is ignored (the no-distillation baseline)                            |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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


def soft_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Soft targets only: T²·KL(softmax(t/T) ‖ softmax(s/T)); labels are never read."""
    return soft_kl(student, teacher, temperature)


def mse_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    """Logit regression (Ba & Caruana 2014): (1-a)·CE + a·mean over rows and classes of (s-t)².

    No temperature: T²·((s - t)/T)² = (s - t)², so regressing softened logits changes nothing.
    """
    loss = alpha * F.mse_loss(student, teacher)
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * labelled_ce(student, labels)
    return loss


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): CE + a·T²·TCKD + b·T²·NCKD.

    TCKD: KL between the binary (target, rest) distributions of teacher and student at T.
    NCKD: KL between their distributions over the non-target classes only, at T.
    The target class is the label; an unlabelled row takes the teacher's top-1 class.
    """
    target = torch.where(labels >= 0, labels, teacher.argmax(1))  # (B,)
    b, c = student.shape
    is_target = F.one_hot(target, c).bool()  # (B, C)
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:  # (B, 2): log [p_target, 1 - p_target]
        rest = log_p.masked_select(~is_target).view(b, c - 1).logsumexp(1)
        return torch.stack([log_p.masked_select(is_target), rest], 1)

    tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="batchmean", log_target=True)
    # Non-target classes alone, renormalised: drop the target column, then log-softmax.
    others_s = (student / temperature).masked_select(~is_target).view(b, c - 1)
    others_t = (teacher / temperature).masked_select(~is_target).view(b, c - 1)
    nckd = F.kl_div(
        F.log_softmax(others_s, 1),
        F.log_softmax(others_t, 1),
        reduction="batchmean",
        log_target=True,
    )
    kd = (alpha * tckd + beta * nckd) * temperature**2
    return labelled_ce(student, labels) + kd


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b.  # (B,)"""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """DIST (Huang et al. 2022): CE + T²·(b·(1 - inter-class ρ) + g·(1 - intra-class ρ)).

    Inter-class: Pearson ρ between each row's student and teacher probabilities at T,
    averaged over rows. Intra-class: the same over each class's column across the batch.
    """
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.T, p_t.T).mean()
    kd = (beta * inter + gamma * intra) * temperature**2
    return labelled_ce(student, labels) + kd


def ce_loss(
    student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """The no-distillation baseline: labels only, teacher ignored."""
    return labelled_ce(student, labels)


@dataclass(frozen=True)
class LossSpec:
    """A loss and the hyperparameters it takes, with the defaults of its paper."""

    fn: Callable[..., torch.Tensor]
    defaults: dict[str, float]  # alpha / beta / gamma → default
    uses_temperature: bool = True
    uses_teacher: bool = True
    # alpha in [0, 1] splits (1-a)·CE from a·(teacher term): a < 1 needs labels.
    alpha_mixes_ce: bool = False


LOSSES: dict[str, LossSpec] = {
    "kd": LossSpec(kd_loss, {"alpha": 0.9}, alpha_mixes_ce=True),
    "soft": LossSpec(soft_loss, {}),
    "mse": LossSpec(mse_loss, {"alpha": 1.0}, uses_temperature=False, alpha_mixes_ce=True),
    "dkd": LossSpec(dkd_loss, {"alpha": 1.0, "beta": 8.0}),
    "dist": LossSpec(dist_loss, {"beta": 1.0, "gamma": 1.0}),
    "ce": LossSpec(ce_loss, {}, uses_temperature=False, uses_teacher=False),
}

LossOnBatch = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise PipelineError(f"unknown loss '{name}' (valid: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


def loss_params(
    name: str, alpha: float | None = None, beta: float | None = None, gamma: float | None = None
) -> dict[str, float]:
    """The weights loss `name` uses: the given ones, else its defaults. Others are dropped.

    kd and mse need alpha in [0, 1] (it splits CE from the teacher term); every weight >= 0.
    """
    spec = get_loss(name)
    given = {"alpha": alpha, "beta": beta, "gamma": gamma}
    params = {k: float(v if given[k] is None else given[k]) for k, v in spec.defaults.items()}
    for key, value in params.items():
        unit = key == "alpha" and spec.alpha_mixes_ce
        if value < 0 or (unit and value > 1):
            raise PipelineError(f"--{key} must be {'in [0, 1]' if unit else '>= 0'}, got {value}")
    return params


def bind_loss(name: str, temperature: float, params: dict[str, float]) -> LossOnBatch:
    """loss(student, teacher, labels) with the temperature and weights fixed."""
    spec = get_loss(name)
    if temperature <= 0:
        raise PipelineError(f"--temperature must be > 0, got {temperature}")
    kwargs = dict(params)
    if spec.uses_temperature:
        kwargs["temperature"] = temperature
    return partial(spec.fn, **kwargs)
