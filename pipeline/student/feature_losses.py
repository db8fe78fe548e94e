"""Feature losses: matching what the teacher computes on the way to its logits.

Stage one caches, per sample and view, nodes `features/NAME` of a KIND (`attention`, `hint`,
`fsp`, `input-grad`, `grad-attention`). Each loss here reads one kind and computes the student's
side from the student's own activations (or, for the derivative losses, its logits and the
inputs they were computed from). A loss returns its value UNWEIGHTED; its weight is its
`weight` setting, so the trainer forms

    total = logit_loss + Σ_i spec_i.weight_at(settings_i, epoch) · spec_i.bind(settings_i, ...)(...)

The layer losses take one tensor per guided layer (or a list of them: the loss's own reduction
over layers, a sum or a mean, is applied). Batch-first everywhere; B is the batch.

| name    | kind           | unweighted loss (l: layer or layer pair)                | weight |
|---------|----------------|---------------------------------------------------------|--------|
| at      | attention      | Σ_l mean_{b,j} (Q_s - Q_t)², Q = normalise(mean_c |A|^p) | 10³    |
| fitnet  | hint           | Σ_l ½ · mean over elements of (r_l(S_l) - H_l)²          | 1      |
| nst     | hint           | Σ_l mean_b MMD² of channels, kernel (xᵀy + c)^d          | 50     |
| fsp     | fsp            | mean_l mean_{b,i,j} (G_s - G_t)², G = A·Bᵀ/(H·W)         | 1      |
| sobolev | input-grad     | mean_{b,k} ‖g_s,k - g_t,k‖², g_k = ∂⟨p(z/T), r_k⟩/∂x     | 1      |
| grad-at | grad-attention | at's formula on the attention maps of each g_k           | 10³    |

p(z/T) = softmax(z/T). Each default's source is in its loss's docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.student.losses import IntSetting, Setting

KINDS = ("attention", "hint", "fsp", "input-grad", "grad-attention")
# Settings the trainer reads to weight and schedule a loss; the others go to the loss function.
TRAINER_SETTINGS = frozenset({"weight", "weight_decay", "hint_epochs", "pretrain_epochs"})

Layers = torch.Tensor | Sequence[torch.Tensor]
# Values of the cached node that differ per row (each sample's own projections): the trainer
# passes them with every batch instead of binding them once.
PER_BATCH = frozenset({"projections"})


@dataclass(frozen=True)
class FeatureLossSpec:
    """A registered feature loss: its function, the cached kind it reads, and its settings."""

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str
    settings: dict[str, Setting] = field(default_factory=dict)
    student: str = ""  # what the trainer passes as the loss's first argument
    from_cache: tuple[str, ...] = ()  # keyword arguments fixed by stage one (the node's attrs)
    regressor: bool = False  # takes `regressors=`: one make_regressor per layer, trained, saved
    paper: str = ""

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def resolve(self, given: Iterable[tuple[str, str, Any]] = ()) -> dict[str, float]:
        """The settings: defaults overlaid by (where, key, value) triples, checked, in order.

        `where` names the value's source in errors: ``params.yaml:features.at.weight``.
        """
        values = {k: s.default for k, s in self.settings.items()}
        for where, key, value in given:
            if key not in self.settings:
                raise PipelineError(
                    f"{where}: feature loss {self.name} has no setting '{key}' "
                    f"(its settings: {', '.join(self.settings)})"
                )
            values[key] = self.settings[key].check(value, where)
        return values

    def weight_at(self, settings: dict[str, float], epoch: int) -> float:
        """The loss's weight in the total at `epoch` (0-based): weight · weight_decay^epoch."""
        return settings["weight"] * settings.get("weight_decay", 1.0) ** epoch

    def pretrain_epochs(self, settings: dict[str, float]) -> int:
        """Epochs of the paper's first stage (this loss alone, before the logit loss); 0: none."""
        return int(settings.get("hint_epochs", settings.get("pretrain_epochs", 0.0)))

    def bind(self, settings: dict[str, float], **from_cache: Any) -> Callable[..., torch.Tensor]:
        """loss(student, teacher, **per_batch) with the loss's settings and the cached node's
        attributes (`from_cache`: p, projections, temperature) fixed."""
        missing = [k for k in self.from_cache if k not in from_cache and k not in PER_BATCH]
        extra = [k for k in from_cache if k not in self.from_cache]
        if missing or extra:
            raise PipelineError(
                f"feature loss {self.name} takes {', '.join(self.from_cache) or 'nothing'} from "
                f"the cached node, got {', '.join(from_cache) or 'nothing'}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in settings.items():
            if key not in TRAINER_SETTINGS:
                whole = isinstance(self.settings[key], IntSetting)
                kwargs[key] = int(value) if whole else value
        return partial(self.fn, **kwargs, **from_cache)


FEATURE_LOSSES: dict[str, FeatureLossSpec] = {}  # registration order


def register_feature_loss(
    name: str,
    *,
    kind: str,
    settings: dict[str, Setting] | None = None,
    student: str = "",
    from_cache: tuple[str, ...] = (),
    regressor: bool = False,
    paper: str = "",
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register `fn(student, teacher, *, **settings, **from_cache)` for a kind.

    Every feature loss declares a `weight` setting: the trainer multiplies the loss by it.
    """
    if kind not in KINDS:
        raise ValueError(f"feature loss {name!r}: unknown kind {kind!r} (kinds: {KINDS})")
    if "weight" not in (settings or {}):
        raise ValueError(f"feature loss {name!r} must declare a 'weight' setting")

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in FEATURE_LOSSES:
            warnings.warn(
                f"feature loss {name!r} is registered again: the new one replaces it",
                stacklevel=2,
            )
        FEATURE_LOSSES[name] = FeatureLossSpec(
            name, fn, kind, dict(settings or {}), student, tuple(from_cache), regressor, paper
        )
        return fn

    return register


def get_feature_loss(name: str) -> FeatureLossSpec:
    """A registered feature loss, or an error listing the valid names."""
    if name not in FEATURE_LOSSES:
        raise PipelineError(
            f"unknown feature loss '{name}' (valid: {', '.join(sorted(FEATURE_LOSSES))})"
        )
    return FEATURE_LOSSES[name]


def describe_feature_losses() -> list[dict[str, Any]]:
    """Every feature loss for `pipeline losses`: kind, student side, settings, paper."""
    return [
        {
            "name": spec.name,
            "kind": spec.kind,
            "student": spec.student,
            "settings": {
                k: {"default": v.default, "range": v.bounds(), "doc": v.doc}
                for k, v in spec.settings.items()
            },
            "paper": spec.paper,
        }
        for spec in FEATURE_LOSSES.values()
    ]


def list_feature_losses(kind: str | None = None) -> list[str]:
    """Registered feature-loss names in registration order; only those reading `kind` if given."""
    return [n for n, s in FEATURE_LOSSES.items() if kind is None or s.kind == kind]


# ---------------------------------------------------------------------------------- helpers


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _layers(name: str, student: Layers, teacher: Layers) -> list[tuple[torch.Tensor, ...]]:
    """Student and teacher as layer pairs; a single tensor is one layer."""
    s = [student] if isinstance(student, torch.Tensor) else list(student)
    t = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    if not s or len(s) != len(t):
        raise PipelineError(
            f"{name}: {len(s)} student layers for {len(t)} teacher features (one each)"
        )
    return list(zip(s, t, strict=True))


def _refuse(name: str, s_what: str, s: Any, t_what: str, t: Any, why: str) -> PipelineError:
    """The one-line shape error: both shapes named."""
    return PipelineError(
        f"{name}: student {s_what} {tuple(s)} vs teacher {t_what} {tuple(t)}: {why}"
    )


def _common_size(
    name: str, s: torch.Tensor, t: torch.Tensor, s_what: str, t_what: str, first: int
) -> tuple[int, ...]:
    """The spatial size both sides are compared at: the smaller one, when it is no larger in
    every dimension (the larger side is then adaptive-average-pooled). Spatial dims start at
    `first`; 1 or 2 of them."""
    a, b = tuple(s.shape[first:]), tuple(t.shape[first:])
    if len(a) != len(b) or len(a) not in (1, 2) or s.shape[0] != t.shape[0]:
        why = "expected equal batch and 1 or 2 spatial dimensions on both sides"
        raise _refuse(name, s_what, s.shape, t_what, t.shape, why)
    if all(x >= y for x, y in zip(a, b, strict=True)):
        return b
    if all(x <= y for x, y in zip(a, b, strict=True)):
        return a
    why = "one spatial size must be no larger than the other in every dimension"
    raise _refuse(name, s_what, s.shape, t_what, t.shape, why)


def _pool(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of x (B, C, *spatial) to `size`; x itself when already there."""
    if tuple(x.shape[2:]) == size:
        return x
    pool = F.adaptive_avg_pool1d if len(size) == 1 else F.adaptive_avg_pool2d
    return pool(x, size)


# ------------------------------------------------------------------------ attention transfer


def attention(activation: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The AT map stage one caches (`pipeline.cache.features.attention_map`, one formula for both
    stages): mean over channels of |A|^p, flattened, L2-normalised.  # (B, prod(spatial))"""
    from pipeline.cache.features import attention_map

    return attention_map(activation, p)


def _matched_maps(
    name: str, s: torch.Tensor, t: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student activation (B, C, *spatial) and teacher map (B, *spatial') or flat (B, L) as two
    L2-normalised (B, positions) maps of one size. A larger student has its ACTIVATION
    adaptive-average-pooled to the teacher's size before its map is taken, as RepDistiller and
    mdistiller do (pooling the map instead gives another value); a larger teacher is refused,
    since its activation, which that order would pool, is not in the cache."""
    if not (math.isfinite(p) and p > 0):
        raise PipelineError(f"{name}: p must be a finite number > 0, got {p}")
    if s.ndim not in (3, 4) or t.ndim not in (2, 3) or s.shape[0] != t.shape[0]:
        why = "expected (B, C, H, W) or (B, C, L) against (B, H, W), (B, L) or flat (B, H·W)"
        raise _refuse(name, "activation", s.shape, "attention map", t.shape, why)
    if t.ndim == 2 and s.ndim == 4:  # a flat teacher map: its H, W are unknown here
        if t.shape[1] != s[0, 0].numel():
            why = "a flat teacher map must have H·W entries; give it as (B, H, W) to pool"
            raise _refuse(name, "activation", s.shape, "attention map", t.shape, why)
        t = t.reshape(len(t), *s.shape[2:])
    own, theirs = tuple(s.shape[2:]), tuple(t.shape[1:])
    if len(own) != len(theirs):
        why = "expected the same number of spatial dimensions on both sides"
        raise _refuse(name, "activation", s.shape, "attention map", t.shape, why)
    if any(x < y for x, y in zip(own, theirs, strict=True)):
        if all(x <= y for x, y in zip(own, theirs, strict=True)):
            why = (
                "the teacher's map is larger, and AT pools the larger side's activation before "
                "taking its map (RepDistiller, mdistiller), which the cache does not hold: guide "
                "a student layer no smaller than the teacher's, or cache the attention of a "
                "teacher layer no larger than the student's (`pipeline layers` lists the sizes)"
            )
        else:
            why = "one spatial size must be no larger than the other in every dimension"
        raise _refuse(name, "activation", s.shape, "attention map", t.shape, why)
    q_s = attention(_pool(s, theirs), p)  # (B, positions): pooled activation, then its map
    return q_s, F.normalize(t.to(q_s).flatten(1), dim=1)


@register_feature_loss(
    "at",
    kind="attention",
    settings={
        "weight": Setting(1e3, doc="β: the paper's CIFAR value, on Σ_l mean (Q_s - Q_t)²"),
        "weight_decay": Setting(
            1.0, 0.0, 1.0, "β is multiplied by this each epoch; < 1 decays it (AT + KD)"
        ),
    },
    student="activation (B, C, H, W) or (B, C, L) of the student layer guided by each node",
    from_cache=("p",),
    paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention (ICLR)",
)
def at_loss(student: Layers, teacher: Layers, *, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: Σ over layers of the mean over batch and positions of (Q_s - Q_t)².

    student: per layer the activation (B, C, H, W) (or (B, C, L)); teacher: the cached map
    (B, H', W'), (B, L') or flat (B, H'·W') (flat only when H'·W' = H·W). Q_s = attention(A, p).
    Different sizes follow RepDistiller and mdistiller, which adaptive-average-pool the larger
    side's ACTIVATION to the smaller size and then take its map: a larger student activation
    is pooled to (H', W') here; a larger teacher is refused (stage one cached its map, not its
    activation), naming both shapes. Odd p: the map is mean_c |A|^p here (the paper's
    definition, and what stage one caches); the references' code takes A^p without the
    absolute value, the same for even p and for non-negative (post-ReLU) activations only.
    With weight β the per-layer term is β/(B·H·W) · Σ_b,j (Q_s - Q_t)²: the
    "β = 10³ / (H·W·N) per layer" of the paper, exactly as its code (`at_loss` = mean,
    `opt.beta * sum(...)` with `--beta 1e+3`); the paper's eq. 2 writes β/2 and an unsquared
    norm, which its code does not use.
    """
    total = torch.zeros(())
    for s, t in _layers("at", student, teacher):
        q_s, q_t = _matched_maps("at", s, t, p)
        total = total.to(q_s) + (q_s - q_t).pow(2).mean()
    return total


# ---------------------------------------------------------------------------------- FitNets


def make_regressor(student_shape: Sequence[int], hint_shape: Sequence[int]) -> nn.Module:
    """FitNets' regressor r from the student's guided layer to the hint, per-sample shapes
    (no batch dimension): (D,) -> (D',) a linear layer; (C, H, W) -> (C', H', W') (or (C, L))
    a convolution, 1×1 when the sizes are equal, k×k with stride k when the student's is k
    times the hint's (k may differ per dimension). Anything else is refused, both shapes named.
    The trainer adds its parameters to the optimizer and its state_dict to the checkpoint.
    """
    s, h = tuple(int(d) for d in student_shape), tuple(int(d) for d in hint_shape)

    def refuse(why: str) -> PipelineError:
        return PipelineError(f"fitnet: cannot map student features {s} to hint {h}: {why}")

    if len(s) != len(h) or len(s) not in (1, 2, 3) or min(s + h) < 1:
        raise refuse("give per-sample shapes of one rank, (D,), (C, L) or (C, H, W), no batch")
    if len(s) == 1:
        return nn.Linear(s[0], h[0])
    if any(a % b for a, b in zip(s[1:], h[1:], strict=True)):
        raise refuse("the student's spatial size must equal the hint's or be a whole multiple")
    k = tuple(a // b for a, b in zip(s[1:], h[1:], strict=True))
    conv = nn.Conv1d if len(s) == 2 else nn.Conv2d
    return conv(s[0], h[0], kernel_size=k, stride=k)


@register_feature_loss(
    "fitnet",
    kind="hint",
    settings={
        "weight": Setting(1.0, doc="weight of ½·mean (r(S) - H)² beside the logit loss"),
        "hint_epochs": IntSetting(
            0, doc="epochs of the paper's stage 1 first: this loss alone, up to the guided layer"
        ),
    },
    student="activation of the guided layer (B, *s), mapped by make_regressor(s, hint shape)",
    regressor=True,
    paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets (ICLR)",
)
def fitnet_loss(
    student: Layers, teacher: Layers, *, regressors: nn.Module | Sequence[nn.Module]
) -> torch.Tensor:
    """FitNets hint loss: Σ over layers of ½ · mean over all elements of (r(S) - H)².

    student: per layer the guided activation (B, *s); teacher: the cached hint (B, *h), float16
    cast to the student's dtype; regressors: one make_regressor(s, h) per layer. The paper's
    ½·‖r(S) - H‖² is taken as a mean over the B·prod(h) elements, not a sum.
    Defaults: the paper never weighs the hint against another loss (stage 1 trains the student
    up to the guided layer, and r, on it alone; stage 2 trains on KD alone), so weight 1 is
    neutral; RepDistiller's CIFAR-100 benchmark runs it single-stage with 100 on a plain MSE
    (200 here). hint_epochs 0 is single-stage; the paper's recipe is hint_epochs > 0, weight 0.
    """
    pairs = _layers("fitnet", student, teacher)
    many = isinstance(regressors, (nn.ModuleList, list, tuple))
    regs = list(regressors) if many else [regressors]
    if len(regs) != len(pairs):
        raise PipelineError(f"fitnet: {len(regs)} regressors for {len(pairs)} guided layers")
    total = torch.zeros(())
    for (s, h), r in zip(pairs, regs, strict=True):
        try:
            out = r(s)
        except RuntimeError:
            out = None
        if out is None or out.shape != h.shape:
            why = "the regressor does not map one to the other; build it with make_regressor"
            raise _refuse("fitnet", "features", s.shape, "hint", h.shape, why)
        total = total.to(out) + 0.5 * (out - h.to(out)).pow(2).mean()
    return total


# --------------------------------------------------------------- neural selectivity transfer


def _poly_mmd(f_s: torch.Tensor, f_t: torch.Tensor, degree: int, c: float) -> torch.Tensor:
    """Per-sample MMD² between the rows of f_s (B, C_s, L) and of f_t (B, C_t, L) under the
    kernel (xᵀy + c)^d: mean k(s, s') + mean k(t, t') - 2 · mean k(s, t)."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B,): mean over row pairs
        return (a @ b.transpose(1, 2) + c).pow(degree).mean((1, 2))

    return k(f_s, f_s) + k(f_t, f_t) - 2 * k(f_s, f_t)


@register_feature_loss(
    "nst",
    kind="hint",
    settings={
        "weight": Setting(50.0, doc="λ on MMD², as in the authors' released code (kt_weight)"),
        "degree": IntSetting(2, 1, 8, "d of the polynomial kernel (xᵀy + c)^d"),
        "c": Setting(0.0, doc="c of the polynomial kernel (xᵀy + c)^d"),
    },
    student="activation (B, C_s, H, W) or (B, C_s, L) of the student layer matched to the hint",
    paper="Huang & Wang 2017, Like What You Like: Knowledge Distill via Neuron Selectivity "
    "Transfer",
)
def nst_loss(student: Layers, teacher: Layers, *, degree: int = 2, c: float = 0.0) -> torch.Tensor:
    """Neural selectivity transfer: Σ over layers of the batch mean of MMD² between the
    student's and the teacher's channels, each channel's map flattened and L2-normalised.

    student (B, C_s, H, W) and teacher hint (B, C_t, H', W') (or (B, C, L)); channel counts
    may differ; the larger spatial size is adaptive-average-pooled to the smaller.
    MMD² = 1/C_s² Σ k(s_i, s_i') + 1/C_t² Σ k(t_j, t_j') - 2/(C_s·C_t) Σ k(s_i, t_j), with
    k(x, y) = (xᵀy + c)^d; the teacher-only term is constant but kept, so the loss is MMD².
    Defaults d = 2, c = 0 (the paper's polynomial kernel); weight 50 as the authors' released
    code (cfgs.py: kt_weight = 50 for mmd, applied to this mean-form MMD² with no ½) and
    RepDistiller's CIFAR-100 runs; the paper's eq. writes (λ/2)·MMD², so this is λ = 100 there.
    """
    total = torch.zeros(())
    for s, t in _layers("nst", student, teacher):
        if s.ndim != t.ndim:
            why = "expected (B, C, H, W) or (B, C, L) on both sides"
            raise _refuse("nst", "activation", s.shape, "hint", t.shape, why)
        size = _common_size("nst", s, t, "activation", "hint", 2)
        f_s = F.normalize(_pool(s, size).flatten(2), dim=2)  # (B, C_s, positions)
        f_t = F.normalize(_pool(t.to(s), size).flatten(2), dim=2)  # (B, C_t, positions)
        total = total.to(f_s) + _poly_mmd(f_s, f_t, degree, c).mean()
    return total


# --------------------------------------------------------------- flow of solution procedure


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The FSP (Gram) matrix of two layers of equal spatial size: G = A·Bᵀ/(H·W).

    a (B, C_a, H, W), b (B, C_b, H, W) -> (B, C_a, C_b); G[i, j] = Σ_hw A_i,hw·B_j,hw / (H·W).
    """
    if a.ndim < 3 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise PipelineError(
            f"fsp: layers {_shape(a)} and {_shape(b)} need the same batch and spatial size"
        )
    from pipeline.cache.features import fsp_matrix as stage_one_fsp  # one formula for both stages

    return stage_one_fsp(a, b).to(a.dtype)


@register_feature_loss(
    "fsp",
    kind="fsp",
    settings={
        "weight": Setting(1.0, doc="λ of every layer pair (the paper weights them equally)"),
        "pretrain_epochs": IntSetting(
            0, doc="epochs of the paper's stage 1 first: this loss alone, then the task loss"
        ),
    },
    student="a pair (A, B) of student activations (B, C_a, H, W), (B, C_b, H, W) per node",
    paper="Yim et al. 2017, A Gift from Knowledge Distillation (CVPR)",
)
def fsp_loss(
    student: tuple[torch.Tensor, torch.Tensor] | Sequence[tuple[torch.Tensor, torch.Tensor]],
    teacher: Layers,
) -> torch.Tensor:
    """FSP: mean over layer pairs of the mean over batch and entries of (G_s - G_t)².

    student: per pair two activations of equal spatial size; teacher: the cached (B, C_a, C_b).
    Per pair that is Σ_b ‖G_s - G_t‖²_F / (B·C_a·C_b). Channel counts must equal the teacher's:
    no regressor is applied (the paper pairs layers of equal width). Defaults: weight 1 (the
    paper's equal λ_i); pretrain_epochs 0 is single-stage, while the paper trains on this loss
    alone first (stage 1), then on the task loss alone.
    """
    one = isinstance(student, tuple) and len(student) == 2
    pairs = [student] if one and isinstance(student[0], torch.Tensor) else list(student)
    losses = []
    for (a, b), g_t in _layers("fsp", pairs, teacher):
        g_s = fsp_matrix(a, b)
        if g_s.shape != g_t.shape:
            why = f"from layers {_shape(a)}, {_shape(b)}: channel counts must be the teacher's"
            raise _refuse("fsp", "FSP matrix", g_s.shape, "FSP matrix", g_t.shape, why)
        losses.append((g_s - g_t.to(g_s)).pow(2).mean())
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------ Sobolev training


def make_projections(count: int, num_classes: int, seed: int) -> torch.Tensor:
    """K unit vectors r_k ∈ R^C from a Gaussian seeded by `seed` alone: (K, C) float32."""
    if count < 1 or num_classes < 1:
        raise PipelineError(f"projections: need K >= 1 and C >= 1, got {count}, {num_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    r = torch.randn(count, num_classes, generator=gen, dtype=torch.float64)
    return F.normalize(r, dim=1).float()


def input_grads(
    logits: torch.Tensor,
    inputs: torch.Tensor,
    projections: torch.Tensor,
    temperature: float,
    *,
    create_graph: bool = True,
) -> torch.Tensor:
    """g_k = ∂⟨softmax(logits/T), r_k⟩/∂inputs for each projection: (B, K, *input_shape).

    logits (B, C) computed from inputs (B, *input_shape) with inputs.requires_grad;
    projections (K, C), or (B, K, C) per row (each sample's own, as stage one draws them).
    create_graph=True (double backprop) lets a loss on g train the model.
    Summing over the batch gives per-sample gradients only when samples do not interact
    (eval-mode BatchNorm; train-mode batch statistics add cross-sample terms).
    """
    if not inputs.requires_grad:
        raise PipelineError(
            "input gradients: the inputs must require grad before the forward pass "
            "(inputs.requires_grad_(True), then logits = model(inputs))"
        )
    per_row = projections.ndim == 3 and projections.shape[0] == logits.shape[0]
    if (
        logits.ndim != 2
        or not (projections.ndim == 2 or per_row)
        or (projections.shape[-1] != logits.shape[1])
    ):
        raise PipelineError(
            f"input gradients: logits {_shape(logits)} vs projections {_shape(projections)}: "
            "expected (B, C) and (K, C) or per row (B, K, C)"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise PipelineError(f"input gradients: temperature must be > 0, got {temperature}")
    p = F.softmax(logits / temperature, dim=1)
    r = projections.to(logits)
    y = (p[:, None, :] * r).sum(2) if per_row else p @ r.T  # (B, K)
    grads = []
    for k in range(y.shape[1]):
        (g,) = torch.autograd.grad(
            y[:, k].sum(), inputs, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        if g is None:
            raise PipelineError("input gradients: the logits do not depend on the inputs")
        grads.append(g)
    return torch.stack(grads, 1)


def student_input_grads(
    model: nn.Module, x: torch.Tensor, projections: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The student's input gradients on x (B, *input_shape): (B, K, *input_shape), with a graph
    back to the model's parameters. Runs its own forward pass; a trainer that also needs the
    logits passes them to `sobolev_loss` instead."""
    x = x.detach().requires_grad_(True)
    return input_grads(model(x), x, projections, temperature)


@register_feature_loss(
    "sobolev",
    kind="input-grad",
    settings={"weight": Setting(1.0, doc="weight of mean_{b,k} ‖g_s,k - g_t,k‖²")},
    student="logits (B, C) of inputs that require grad; pass inputs= per batch",
    from_cache=("projections", "temperature"),
    paper="Czarnecki et al. 2017, Sobolev Training for Neural Networks (NeurIPS)",
)
def sobolev_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    inputs: torch.Tensor,
    projections: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Derivative matching: mean over batch and projections of ‖g_s,k - g_t,k‖² (squared L2
    norm summed over the input's elements).

    student: logits (B, C) of `inputs` (B, *input_shape), which require grad; teacher: the
    cached gradients (B, K, *input_shape) for the same projections (K, C) and temperature.
    g_s is taken with double backprop, so the loss trains the student. The paper gives no
    CIFAR weight for this projected form; weight 1 is a neutral start, to be tuned.
    """
    g_s = input_grads(student, inputs, projections, temperature)  # (B, K, *input_shape)
    if g_s.shape != teacher.shape:
        why = "expected (B, K, *input_shape) for the cache's K projections"
        raise _refuse("sobolev", "input gradients", g_s.shape, "input-grad", teacher.shape, why)
    return (g_s - teacher.to(g_s)).pow(2).flatten(2).sum(2).mean()


@register_feature_loss(
    "grad-at",
    kind="grad-attention",
    settings={"weight": Setting(1e3, doc="β, normalised as at's (not from the paper)")},
    student="logits (B, C) of image inputs (B, C_in, H, W) that require grad; labels= per batch",
    paper="Zagoruyko & Komodakis 2017, §3.2 (gradient-based attention)",
)
def grad_at_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Gradient-based attention transfer: mean over batch and positions of (Q_s - Q_t)², Q the
    map stage one caches (`pipeline.cache.features.gradient_attention`): Σ_c |∂CE(z, y)/∂x|,
    flattened, L2-normalised, y the label (the teacher's top class where it is -1).

    student: logits (B, C) of `inputs` (B, C_in, H, W), which require grad (double backprop
    trains the student); teacher: the cached maps (B, H·W); labels (B,) with -1 replaced.
    """
    from pipeline.cache.features import gradient_attention

    q_s = gradient_attention(student, inputs, labels, create_graph=True)
    if q_s.shape != teacher.shape:
        why = "expected flat (B, H·W) maps of the same input"
        raise _refuse("grad-at", "gradient map", q_s.shape, "grad-attention", teacher.shape, why)
    return (q_s - teacher.to(q_s)).pow(2).mean()
