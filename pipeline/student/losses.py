"""Distillation losses, and the registry that owns each loss's settings.

Every loss takes raw logits, so one cache serves every temperature. Shapes: student and
teacher logits (B, C); labels (B,) int64 with -1 where unknown. Each loss is checked against a
hand-written reference formula in tests/test_losses.py.

| name | formula (CE is over the labelled rows of the batch only) |
|---|---|
| kd   | (1-a)·CE + a·T²·KL(softmax(t/T) ‖ softmax(s/T))                  Hinton et al. 2015 |
| soft | T²·KL(softmax(t/T) ‖ softmax(s/T)); labels unused             unlabelled transfer sets |
| mse  | (1-a)·CE + a·mean((s - t)²); T cancels out of logit regression     Ba & Caruana 2014 |
| dkd  | CE + w(epoch)·(a·T²·TCKD + b·T²·NCKD); w the warm-up, 1 by default  Zhao et al. 2022 |
| dist | CE + b·T²·(1 - inter-class ρ) + g·T²·(1 - intra-class ρ)            Huang et al. 2022 |
| ce   | CE; the teacher is ignored (the no-distillation baseline)                            |

A loss is one function registered with `register_loss`, which declares its settings (default
and bounds), whether it takes a temperature and the teacher, and its paper; and, for losses
that read the teacher only through its distribution at T, the same loss on a given target
distribution (`on_distribution`: kd and soft), which is how they train from sampled targets
(`pipeline.cache.sparse`: a (B, C) estimate of softmax(t/T), zeros allowed, in place of t).
`params.yaml` (`losses.NAME`) and the command line (`--loss-arg NAME=VALUE`, `--alpha`...) are
validated against that declaration alone. `--loss package.module:function` uses a user loss of the
same signature; its keyword-only arguments with numeric defaults are its settings. A loss registered
with `epoch=True` (dkd, for its warm-up) also takes the 0-based training epoch: it binds as an
`EpochLoss`, which the trainer calls with `epoch=`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.cache.sparse import sparse_kd_loss
from pipeline.core.config import FLOAT32_MAX
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.usercode import is_reference, load_function

LossOnBatch = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
TARGET_FORMS = ("logits", "distribution")  # what a bound loss is given as the teacher


@dataclass(frozen=True)
class Setting:
    """One numeric setting of a loss: its default and the closed range [low, high] it takes."""

    default: float
    low: float = 0.0
    high: float = math.inf
    doc: str = ""

    def bounds(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f">= {self.low:g}"
        return f"in [{self.low:g}, {self.high:g}]"

    def check(self, value: Any, where: str) -> float:
        """`value` as a float, or an error naming `where` (a params key or an option)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise PipelineError(f"{where} must be a finite number, got {value:g}")
        if abs(value) > FLOAT32_MAX:  # a loss computes in float32: it would overflow there
            raise PipelineError(f"{where} {value:g} is out of range (at most ±3.4e38, float32)")
        if not self.low <= value <= self.high:
            raise PipelineError(f"{where} must be {self.bounds()}, got {value:g}")
        return value


@dataclass(frozen=True)
class IntSetting(Setting):
    """A setting that takes whole numbers only (epochs, a kernel degree)."""

    def check(self, value: Any, where: str) -> float:
        value = super().check(value, where)
        if value != int(value):
            raise PipelineError(f"{where} must be a whole number, got {value:g}")
        return value


class EpochLoss(partial):
    """A bound loss that also reads the 0-based training epoch (dkd's warm-up): call it as
    loss(student, teacher, labels, epoch=E). The trainer passes `epoch` to a loss whose
    `reads_epoch` is true, and only to it; a resumed run knows its epoch, so it continues
    exactly as an uninterrupted one."""

    reads_epoch = True


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, its settings, and what it reads."""

    name: str
    fn: Callable[..., torch.Tensor]
    settings: dict[str, Setting] = field(default_factory=dict)
    uses_temperature: bool = True
    uses_teacher: bool = True
    reads_epoch: bool = False  # takes keyword `epoch` (0-based): bound as an EpochLoss
    # Whether the loss needs labelled rows with these settings (kd with alpha < 1 does).
    needs_labels: Callable[[dict[str, float]], bool] = lambda settings: False
    paper: str = ""
    origin: dict[str, str] | None = None  # user losses: {"source": ..., "sha256": ...}
    # The same loss given a target distribution at T (B, C) in place of the teacher's logits
    # (sampled targets, pipeline.cache.sparse); None: it cannot train from one.
    on_distribution: Callable[..., torch.Tensor] | None = None

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def resolve(self, given: Iterable[tuple[str, str, Any]] = ()) -> dict[str, float]:
        """The settings: defaults overlaid by `given` (where, key, value) triples in order.

        `where` names the value's source in errors: ``params.yaml:losses.kd.beta``, ``--beta``.
        """
        values = {k: s.default for k, s in self.settings.items()}
        for where, key, value in given:
            if key not in self.settings:
                takes = ", ".join(self.settings) or "none"
                see = "" if self.origin else "; see `pipeline losses`"
                raise PipelineError(
                    f"{where}: loss {self.name} has no setting '{key}' (its settings: {takes}{see})"
                )
            values[key] = self.settings[key].check(value, where)
        return values

    def bind(
        self, temperature: float, settings: dict[str, float], target: str = "logits"
    ) -> LossOnBatch:
        """loss(student, teacher, labels) with the temperature and settings fixed. `target`:
        what `teacher` will be, the teacher's logits (B, C), or a "distribution" (B, C): the
        target at T itself, which only losses with `on_distribution` (or none of the teacher)
        take."""
        if not (math.isfinite(temperature) and temperature > 0):
            raise PipelineError(f"--temperature must be > 0, got {temperature}")
        if target not in TARGET_FORMS:
            raise PipelineError(f"loss target {target!r}: expected one of {TARGET_FORMS}")
        kwargs = dict(settings)
        if self.uses_temperature:
            kwargs["temperature"] = temperature
        fn = self.fn
        if target == "distribution" and self.uses_teacher:
            if self.on_distribution is None:
                raise PipelineError(
                    f"loss {self.name} reads the teacher's logits, and these targets give "
                    "only a distribution (sampled targets): use kd, soft or ce"
                )
            fn = self.on_distribution
        if self.origin is None:
            return (EpochLoss if self.reads_epoch else partial)(fn, **kwargs)
        return partial(_checked_user_loss, fn, self.origin["source"], kwargs)


LOSSES: dict[str, LossSpec] = {}  # registration order: the order `pipeline losses` lists


def register_loss(
    name: str,
    *,
    settings: dict[str, Setting] | None = None,
    temperature: bool = True,
    teacher: bool = True,
    needs_labels: Callable[[dict[str, float]], bool] | None = None,
    paper: str = "",
    on_distribution: Callable[..., torch.Tensor] | None = None,
    epoch: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register `fn(student, teacher, labels, *, [temperature,] [epoch,] **settings)`;
    `on_distribution`: the same loss with a target distribution at T in place of `teacher`
    (same signature), for losses that read the teacher only through softmax(t/T); `epoch`:
    fn takes the 0-based training epoch (keyword `epoch`), which the trainer passes."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in LOSSES:
            warnings.warn(
                f"loss {name!r} is registered again: the new one replaces it", stacklevel=2
            )
        LOSSES[name] = LossSpec(
            name,
            fn,
            dict(settings or {}),
            uses_temperature=temperature,
            uses_teacher=teacher,
            needs_labels=needs_labels or (lambda s: False),
            paper=paper,
            on_distribution=on_distribution,
            reads_epoch=epoch,
        )
        return fn

    return register


def list_losses() -> list[str]:
    """Registered loss names, in registration order."""
    return list(LOSSES)


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


def with_labelled_ce(
    term: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, alpha: float
) -> torch.Tensor:
    """a·term + (1-a)·CE over the labelled rows: how kd and mse mix in the labels."""
    loss = alpha * term
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * labelled_ce(student, labels)
    return loss


def kd_on_distribution(
    student: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """kd given the target at T, (B, C) probabilities (sampled targets): (1-a)·CE(y, s) +
    a·T²·KL(target ‖ softmax(s/T)), with 0·log 0 = 0 for classes never drawn."""
    return with_labelled_ce(
        sparse_kd_loss(student, target, temperature=temperature), student, labels, alpha
    )


def soft_on_distribution(
    student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """soft given the target at T, (B, C) probabilities: T²·KL(target ‖ softmax(s/T))."""
    return sparse_kd_loss(student, target, temperature=temperature)


@register_loss(
    "kd",
    settings={
        "alpha": Setting(0.9, 0.0, 1.0, "weight of the teacher term; (1 - alpha) weights CE")
    },
    needs_labels=lambda s: s["alpha"] < 1,
    paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network",
    on_distribution=kd_on_distribution,
)
def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton KD: (1-a)·CE(y, s) + a·T²·KL(softmax(t/T) ‖ softmax(s/T))."""
    return with_labelled_ce(soft_kl(student, teacher, temperature), student, labels, alpha)


@register_loss(
    "soft",
    paper="Hinton et al. 2015 (soft targets alone, for unlabelled data)",
    on_distribution=soft_on_distribution,
)
def soft_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Soft targets only: T²·KL(softmax(t/T) ‖ softmax(s/T)); labels are never read."""
    return soft_kl(student, teacher, temperature)


@register_loss(
    "mse",
    settings={
        "alpha": Setting(1.0, 0.0, 1.0, "weight of the logit regression; (1 - alpha) weights CE")
    },
    temperature=False,
    needs_labels=lambda s: s["alpha"] < 1,
    paper="Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?",
)
def mse_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float
) -> torch.Tensor:
    """Logit regression (Ba & Caruana 2014): (1-a)·CE + a·mean over rows and classes of (s-t)².

    No temperature: T²·((s - t)/T)² = (s - t)², so regressing softened logits changes nothing.
    """
    return with_labelled_ce(F.mse_loss(student, teacher), student, labels, alpha)


def warmup_factor(epoch: int | None, warmup: float) -> float:
    """min((epoch + 1) / warmup, 1): the KD term's share in 0-based `epoch`; 1 when warmup is 0.

    mdistiller's DKD: min(epoch / WARMUP, 1) with 1-based epochs, so the first epoch trains
    at 1/warmup and epoch `warmup` (1-based) onwards at 1."""
    if warmup <= 0:
        return 1.0
    if epoch is None:
        raise PipelineError(
            f"dkd: warmup {warmup:g} needs the training epoch (call the bound loss with epoch=)"
        )
    return min((epoch + 1) / warmup, 1.0)


@register_loss(
    "dkd",
    settings={
        "alpha": Setting(1.0, doc="TCKD weight (target vs rest)"),
        "beta": Setting(8.0, doc="NCKD weight (among the non-target classes)"),
        "warmup": IntSetting(
            20.0,
            doc="epochs the KD term ramps in over, w = min((epoch + 1) / warmup, 1); 0: off "
            "(20: mdistiller's CIFAR-100 configs, of 240 epochs; scale it to your schedule)",
        ),
    },
    paper="Zhao et al. 2022, Decoupled Knowledge Distillation",
    epoch=True,
)
def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float,
    warmup: float = 20.0,
    epoch: int | None = None,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): CE + w·(a·T²·TCKD + b·T²·NCKD), w the warm-up ramp.

    TCKD: KL between the binary (target, rest) distributions of teacher and student at T.
    NCKD: KL between their distributions over the non-target classes only, at T.
    The target class is the label; an unlabelled row takes the teacher's top-1 class.
    w = min((epoch + 1) / warmup, 1) for the 0-based `epoch`, as mdistiller's min(epoch /
    WARMUP, 1) with its 1-based epochs; CE is never scaled. Default warmup 20, the reference
    code's (mdistiller's CIFAR-100 configs: a twelfth of its 240 epochs; 1 of 100 on
    ImageNet); warmup 0 is the loss of the paper's equations (w = 1).
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
    return labelled_ce(student, labels) + warmup_factor(epoch, warmup) * kd


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b.  # (B,)"""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss(
    "dist",
    settings={
        # The reference's weights: DIST's released configs and torchdistill's ImageNet sample
        # (configs/sample/ilsvrc2012/dist) weigh DIST(beta=1, gamma=1) by kd_loss_weight 2.
        "beta": Setting(2.0, doc="inter-class relation weight (2: DIST's released configs)"),
        "gamma": Setting(2.0, doc="intra-class relation weight (2: DIST's released configs)"),
    },
    paper="Huang et al. 2022, Knowledge Distillation from A Stronger Teacher (NeurIPS); "
    "beta = gamma = 2 as its released code's kd_loss_weight 2",
)
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
    Defaults b = g = 2: the released code's DIST(beta=1, gamma=1) times its kd_loss_weight 2
    (DIST's ImageNet configs; torchdistill's ImageNet sample, weight 2.0), with CE weight 1.
    """
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    inter = 1.0 - _pearson_rows(p_s, p_t).mean()
    intra = 1.0 - _pearson_rows(p_s.T, p_t.T).mean()
    kd = (beta * inter + gamma * intra) * temperature**2
    return labelled_ce(student, labels) + kd


@register_loss(
    "ce",
    temperature=False,
    teacher=False,
    needs_labels=lambda s: True,
    paper="the no-distillation baseline",
)
def ce_loss(
    student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """The no-distillation baseline: labels only, teacher ignored."""
    return labelled_ce(student, labels)


def get_loss(name: str) -> LossSpec:
    """A registered loss, or a user loss for a `package.module:function` reference."""
    if name in LOSSES:
        return LOSSES[name]
    if is_reference(name):
        if name not in _USER_LOSSES:
            _USER_LOSSES[name] = _user_loss(name)
        return _USER_LOSSES[name]
    raise PipelineError(
        f"unknown loss '{name}' (valid: {', '.join(sorted(LOSSES))}, or package.module:function; "
        "for sequence data: kl, kl-topk, reverse-kl, jsd, kl-sampled)"
    )


_USER_LOSSES: dict[str, LossSpec] = {}


def _user_loss(reference: str) -> LossSpec:
    """A LossSpec for a user function: keyword-only arguments with numeric defaults are its
    settings (any finite value), a keyword-only `temperature` receives T."""
    fn, origin = load_function(reference, "--loss")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise PipelineError(
            f"--loss {reference}: must take (student, teacher, labels, *, [temperature,] "
            "settings...) like the built-in losses"
        )
    settings = {}
    for p in params:
        if p.kind != p.KEYWORD_ONLY or p.name == "temperature":
            continue
        if isinstance(p.default, bool) or not isinstance(p.default, (int, float)):
            raise PipelineError(
                f"--loss {reference}: keyword argument '{p.name}' needs a numeric default "
                "(keyword-only arguments are the loss's settings)"
            )
        settings[p.name] = Setting(float(p.default), -math.inf, math.inf)
    uses_t = any(p.name == "temperature" and p.kind == p.KEYWORD_ONLY for p in params)
    return LossSpec(reference, fn, settings, uses_temperature=uses_t, origin=origin)


def _checked_user_loss(
    fn: Callable[..., Any], source: str, kwargs: dict[str, float], *args: torch.Tensor
) -> torch.Tensor:
    """A user loss, refusing anything but a finite scalar tensor (one line naming it)."""
    try:
        out = fn(*args, **kwargs)
    except BaseException as e:  # sys.exit in user code too: one line, never a silent exit
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PipelineError(f"--loss {source} failed ({one_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PipelineError(f"--loss {source} returned {got}, expected a scalar tensor")
    if not torch.isfinite(out):
        raise PipelineError(f"--loss {source} returned {out.item()}, expected a finite value")
    if torch.is_grad_enabled() and not out.requires_grad:
        raise PipelineError(
            f"--loss {source} returned a value that does not depend on the student's logits "
            "(no gradient): compute it from the `student` argument"
        )
    return out


def bind_loss(name: str, temperature: float, settings: dict[str, float]) -> LossOnBatch:
    """loss(student, teacher, labels) of loss `name` with the temperature and settings fixed."""
    return get_loss(name).bind(temperature, settings)


def loss_settings(name: str, **given: float | None) -> dict[str, float]:
    """The settings of loss `name`: its defaults overlaid by the options `given` (None: not
    given), each named `--KEY` in errors."""
    return get_loss(name).resolve((f"--{k}", k, v) for k, v in given.items() if v is not None)


def distillation_loss(
    name: str, temperature: float = 4.0, *, target: str = "logits", **settings: float
) -> LossOnBatch:
    """Loss `name` as one function of a batch, for your own loop: its settings are its
    defaults (`pipeline losses` lists them) overlaid by `settings`, checked as params.yaml's
    are. Call it as loss(student_logits (B, C), teacher (B, C), labels (B,)) → a scalar,
    labels -1 where unknown; dkd also takes `epoch=` (0-based) for its warm-up. `target`
    "distribution": the teacher argument is the target at T itself (a sampled cache's)."""
    spec = get_loss(name)
    values = spec.resolve((f"{name}.{k}", k, v) for k, v in settings.items())
    return spec.bind(temperature, values, target)
