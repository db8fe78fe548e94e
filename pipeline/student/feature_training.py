"""Feature losses in training: which student layers a loss reads, the hooks that capture them,
and the weighted terms added to a student's logit loss (`pipeline.student.feature_losses`).

A term is written `LOSS:FEATURE[=LAYER[+LAYER2]][:KEY=VALUE,...]` (`--feature-loss`, or
`feature_losses` in params.yaml), e.g.

    at:att3=layers.1                 AT between cached attention `att3` and student layer layers.1
    fitnet:hint2=layers.1:weight=2   FitNets hint through a learned regressor
    nst:hint2=layers.1               neural selectivity transfer on the same hint
    fsp:g=layers.0+layers.2          FSP between a pair of student layers
    sobolev:sob                      derivative matching on cached input gradients (no layer)

FEATURE is a node the cache holds (`pipeline inspect` lists them), of the kind the loss reads.
The student's total loss is logit_loss + Σ weight · feature_loss; during a loss's pre-training
epochs (`hint_epochs`, `pretrain_epochs`), its feature terms alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.cache.features import find_layer
from pipeline.core.errors import PipelineError

DERIVATIVE = ("input-grad", "grad-attention")  # kinds matched on the student's input gradients
STUDENT_HINT = "`pipeline layers STUDENT/student.pt` lists a trained student's"


@dataclass(frozen=True)
class FeatureTerm:
    """One feature loss of a student: loss name, cached feature, student layers, settings."""

    loss: str
    feature: str
    layers: tuple[str, ...]  # student module paths; () for the derivative losses
    settings: dict[str, float] = field(default_factory=dict)
    text: str = ""


def parse_terms(texts: list[str], where: str = "--feature-loss") -> list[FeatureTerm]:
    """The terms of `texts`, each checked against its loss's declaration (kind, settings)."""
    return [_parse(text, where) for text in texts]


def _parse(text: str, where: str) -> FeatureTerm:
    from pipeline.student.feature_losses import get_feature_loss

    parts = str(text).split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise PipelineError(
            f"{where} {text!r}: expected LOSS:FEATURE[=LAYER[+LAYER2]][:KEY=VALUE,...], "
            "e.g. at:att3=layers.1"
        )
    spec = get_feature_loss(parts[0])
    feature, _, layers = parts[1].partition("=")
    paths = tuple(p for p in layers.split("+") if p)
    derivative = spec.kind in DERIVATIVE
    wanted = 0 if derivative else (2 if spec.kind == "fsp" else 1)
    if len(paths) != wanted:
        form = {0: "no student layer", 1: "=LAYER", 2: "=LAYER_A+LAYER_B"}[wanted]
        raise PipelineError(f"{where} {text!r}: {spec.name} takes {form}")
    given = []
    for pair in parts[2].split(",") if len(parts) == 3 else []:
        key, eq, value = pair.partition("=")
        try:
            given.append((f"{where} {text!r}: {key}", key, float(value)))
        except ValueError:
            raise PipelineError(f"{where} {text!r}: {pair!r} is not KEY=NUMBER") from None
        if not eq:
            raise PipelineError(f"{where} {text!r}: {pair!r} is not KEY=NUMBER")
    return FeatureTerm(spec.name, feature, paths, spec.resolve(given), str(text))


def check_terms(terms: list[FeatureTerm], features: dict[str, Any], cache: str) -> None:
    """Each term's feature is in the cache, of the kind its loss reads."""
    from pipeline.student.feature_losses import get_feature_loss

    for term in terms:
        record = features.get(term.feature)
        if record is None:
            have = ", ".join(sorted(features)) or "none"
            raise PipelineError(
                f"--feature-loss {term.text!r}: cache {cache} has no feature {term.feature!r} "
                f"(its features: {have}; precompute with --features)"
            )
        kind = get_feature_loss(term.loss).kind
        if record.get("kind") != kind:
            raise PipelineError(
                f"--feature-loss {term.text!r}: {term.loss} reads {kind} features, "
                f"{term.feature!r} is {record.get('kind')}"
            )


class Capture:
    """Forward hooks keeping the latest output of each named student layer."""

    def __init__(self, model: nn.Module, paths: list[str], what: str):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [
            find_layer(model, p, what, STUDENT_HINT).register_forward_hook(self._keep(p))
            for p in paths
        ]

    def _keep(self, path: str) -> Callable:
        def hook(module, args, output):
            self.outputs[path] = output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class BoundTerm:
    """A term ready for training: its loss with settings and cache values bound."""

    term: FeatureTerm
    fn: Callable[..., torch.Tensor]
    weight: Callable[[int], float]  # epoch -> weight
    pretrain: int  # epochs of this term alone first
    regressors: list[nn.Module] = field(default_factory=list)
    derivative: bool = False
    teacher_shape: tuple[int, ...] | None = None  # an attention map's (H, W), cached flat

    def __call__(
        self,
        captured: dict[str, torch.Tensor],
        x: torch.Tensor,
        out: torch.Tensor,
        batch: Any,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Unweighted value on one batch.  # batch.features[name]: (B, ...), labels (B,)"""
        teacher = batch.features[self.term.feature].to(out.device)
        if self.teacher_shape is not None:
            teacher = teacher.reshape(len(teacher), *self.teacher_shape)
        if self.derivative and self.term.loss == "grad-at":  # CE gradients, as stage one took
            top = batch.logits.to(out.device).argmax(1)  # the teacher's class where unlabelled
            return self.fn(out, teacher, inputs=x, labels=torch.where(labels >= 0, labels, top))
        if self.derivative:
            projections = batch.features[projections_key(self.term)].to(out.device)
            return self.fn(out, teacher, inputs=x, projections=projections)
        student = [captured[p] for p in self.term.layers]
        if self.term.loss == "fsp":
            student = [tuple(student)]
        if self.regressors:
            return self.fn(student, [teacher], regressors=self.regressors)
        return self.fn(student, [teacher])


def projections_key(term: FeatureTerm) -> str:
    """Where a derivative feature's per-row projections travel beside it in a batch."""
    return f"{term.feature}#projections"


def bind_terms(
    terms: list[FeatureTerm],
    features: dict[str, Any],
    model: nn.Module,
    probe: torch.Tensor,
    what: str,
) -> tuple[list[BoundTerm], Capture]:
    """Bind each term to the cache's record of its feature, hook the student's layers and
    build FitNets regressors from the shapes one probe forward gives.  # probe (2, ...)"""
    from pipeline.student.feature_losses import PER_BATCH, get_feature_loss, make_regressor

    capture = Capture(model, sorted({p for t in terms for p in t.layers}), what)
    with torch.no_grad():
        model.eval()(probe)
    bound = []
    for term in terms:
        spec = get_feature_loss(term.loss)
        record = features[term.feature]
        params = record.get("params") or {}
        from_cache = {k: _cache_value(k, params) for k in spec.from_cache if k not in PER_BATCH}
        fn = spec.bind(term.settings, **from_cache)
        regs = []
        if spec.regressor:
            student_shape = tuple(capture.outputs[term.layers[0]].shape[1:])
            regs = [make_regressor(student_shape, tuple(record["shape"]))]
        bound.append(
            BoundTerm(
                term,
                fn,
                lambda epoch, s=spec, t=term: s.weight_at(t.settings, epoch),
                spec.pretrain_epochs(term.settings),
                regs,
                spec.kind in DERIVATIVE,
                _map_shape(record) if spec.kind == "attention" else None,
            )
        )
    capture.outputs.clear()
    return bound, capture


def _map_shape(record: dict[str, Any]) -> tuple[int, ...] | None:
    """The spatial shape of a cached attention map (from its layer's (C, *spatial))."""
    layers = record.get("layer_shapes") or []
    return tuple(layers[0][1:]) if layers and len(layers[0]) > 1 else None


def _cache_value(key: str, params: dict[str, Any]) -> float:
    """A value the loss takes from the cached node: p of attention, T of input gradients."""
    return float(params["t"] if key == "temperature" else params[key])


def row_projections(
    record: dict[str, Any], sample_ids: np.ndarray, views: int, num_classes: int
) -> np.ndarray:
    """Every view's projections of every row, as stage one drew them.  # (N, V, K, C)"""
    from pipeline.cache.features import feature_projections

    per_view = [feature_projections(record, sample_ids, v, num_classes) for v in range(views)]
    return np.stack(per_view, 1)


class FeatureTerms:
    """A student's feature terms as the trainer sees them (training.FeatureSide)."""

    def __init__(self, bound: list[BoundTerm], capture: Capture):
        self.bound, self.capture = bound, capture
        self.modules = nn.ModuleList([r for b in bound for r in b.regressors])
        self.derivative = any(b.derivative for b in bound)
        self.pretrain = max((b.pretrain for b in bound), default=0)

    def value(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        batch: Any,
        labels: torch.Tensor,
        epoch: int,
        pretraining: bool,
    ) -> torch.Tensor:
        """Σ weight · term on this batch (only the pre-training terms while `pretraining`)."""
        total = torch.zeros((), device=out.device)
        for b in self.bound:
            if pretraining and epoch >= b.pretrain:
                continue
            total = total + b.weight(epoch) * b(self.capture.outputs, x, out, batch, labels)
        self.capture.outputs.clear()
        return total

    def sync_grads(self, ranks) -> None:
        """Average the regressors' gradients over the ranks (they live outside DDP)."""
        import torch.distributed as dist

        for p in self.modules.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= ranks.world


def add_projections(
    terms: list[FeatureTerm],
    targets: Any,
    attrs: dict[str, Any],
    sample_ids: np.ndarray,
    cache: str,
) -> None:
    """Check the terms against the cache's features, and give the targets the per-row
    projections of each derivative feature (as stage one drew them)."""
    features = attrs.get("features") or {}
    check_terms(terms, features, cache)
    views, classes = int(attrs.get("num_views", 1)), int(attrs["num_classes"])
    for term in terms:
        if features[term.feature].get("kind") == "input-grad":
            rows = row_projections(features[term.feature], sample_ids, views, classes)
            targets.features[projections_key(term)] = torch.from_numpy(rows)
