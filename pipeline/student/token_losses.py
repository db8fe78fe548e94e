"""Token-level distillation losses that read sparse teacher targets directly.

A language-model teacher is cached per distilled token as a few numbers, never as a row of V
logits: its top-k raw logits `values` (N, k) with their classes `indices` (N, k) and `lse`
(N,), the exact log-sum-exp of all V logits at T = 1; or the K classes drawn from it (distinct
`indices` with their `counts`, Anshumann et al. 2025). These losses take the student's logits
at the distilled positions (N, V) and those targets, and never build a dense (N, V) teacher
row: every teacher quantity lives on the k kept classes plus one *tail bucket* (all the other
classes, taken as one). The student's side is exact: its tail bucket is the log-sum-exp of its
logits outside the kept classes.

p_T = softmax(t / T) is the teacher at temperature T, q_T = softmax(s / T) the student.

Teacher buckets at T. At T = 1 every kept probability exp(v - lse) and the tail mass
m = 1 - sum(exp(v - lse)) are exact. At T != 1 they need the tail's logits, which are not
kept: every tail class is given the one logit that reproduces m at T = 1 (their log-mean-exp,
t_tail = lse + log(m / (V - k)), as `pipeline.cache.sparse` does for sample-level top-k), so
the tail bucket weighs (V - k) exp(t_tail / T): an upper bound of the true weight for T > 1,
a lower bound for T < 1, exact when the tail logits are equal. Ratios among kept classes are
exact at every T. With k = V there is no tail and everything is exact.

The losses, each per token (then averaged over the distilled tokens), each T^2 times a
divergence at T (so gradients keep their scale across T, as in Hinton et al.):

* ``kl``: forward KL between the (k + 1)-bucket views of p_T and q_T. It is not the full
  KL(p_T || q_T): merging classes can only lower a divergence (data processing), so this is
  a lower bound that ignores how each side spreads its tail, with equality at k = V or when
  both tails are proportional. The tail mass is matched, never dropped.
* ``kl-topk``: forward KL between p_T and q_T both renormalised over the k kept classes: exact
  at every T (no tail estimate), but blind to the tail mass; the student is normalised over
  the same k classes as the teacher (normalising one over k and the other over V, as some
  tools do, gives neither divergence).
* ``reverse-kl``: KL(q_T || p_T) over the same k + 1 buckets (a lower bound, as above).
* ``jsd``: the generalised Jensen-Shannon divergence with weight `beta` (beta KL(p || m) +
  (1 - beta) KL(q || m), m = beta p + (1 - beta) q), over the k + 1 buckets.
* ``kl-sampled``: from K draws of p_Tp (proposal temperature Tp): the empirical distribution
  p_hat = c / K on the drawn classes. At T = Tp, -sum(p_hat log q_T) and its gradient are
  unbiased estimates of the cross-entropy part of KL(p_T || q_T) (the loss value adds the
  empirical entropy, a student-free constant biased low). At T != Tp the drawn classes'
  logits (`values`) reweight the draws by exp(v / T - v / Tp), self-normalised: consistent,
  biased O(1/K). Undrawn classes get 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class TokenTargets:
    """Sparse teacher targets of N distilled tokens over a vocabulary of `vocab` classes.

    Top-k: `indices` (N, k), `values` (N, k) raw logits, `lse` (N,). Sampled: `indices` (N, K)
    distinct drawn classes padded with count 0, `counts` (N, K), and `values` (N, K) only to
    train at T != `proposal_temperature`."""

    indices: torch.Tensor  # (N, k) int
    vocab: int
    values: torch.Tensor | None = None  # (N, k) float
    lse: torch.Tensor | None = None  # (N,) float
    counts: torch.Tensor | None = None  # (N, K) int, sampled targets only
    proposal_temperature: float = 1.0

    @property
    def sampled(self) -> bool:
        return self.counts is not None


def _check(student: torch.Tensor, t: TokenTargets, temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise PipelineError(f"temperature {temperature}: expected a positive number")
    if student.ndim != 2 or student.shape[1] != t.vocab:
        raise PipelineError(
            f"token losses: student logits {tuple(student.shape)}, expected (N, {t.vocab})"
        )
    if t.indices.ndim != 2 or len(t.indices) != len(student):
        raise PipelineError(
            f"token losses: targets of {tuple(t.indices.shape)} for {len(student)} tokens"
        )
    if t.indices.numel() and (int(t.indices.min()) < 0 or int(t.indices.max()) >= t.vocab):
        raise PipelineError(f"token losses: a class index is outside [0, {t.vocab})")


def student_buckets(
    student: torch.Tensor, indices: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q_T on the kept classes (N, k) and on the rest as one bucket (N,), exactly: the
    tail is the log-sum-exp of the student's logits outside `indices`."""
    # log_softmax is one fused kernel forward and backward: about twice as fast on a CPU as
    # logsumexp's composite ops, which took most of a small student's loss time.
    log_q = F.log_softmax(student.float() / temperature, 1)  # (N, V)
    idx = indices.long()
    kept = log_q.gather(1, idx)  # (N, k)
    if idx.shape[1] >= student.shape[1]:  # nothing outside: no tail (and no NaN gradient)
        return kept, torch.full_like(kept[:, 0], float("-inf")).detach()
    return kept, _outside_lse(log_q, idx)


def teacher_buckets(t: TokenTargets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_T on the kept classes (N, k) and on the tail bucket (N,), from top-k targets
    (the tail rule of the module doc; -inf when k = V)."""
    if t.values is None or t.lse is None:
        raise PipelineError("top-k token targets need values and lse")
    values = t.values.double()  # (N, k)
    lse = t.lse.double()  # (N,)
    n, k = values.shape
    if k >= t.vocab:
        log_p = (values / temperature).log_softmax(1)
        return log_p.float(), torch.full((n,), float("-inf"), device=lse.device)
    log_kept = values - lse[:, None]  # (N, k) log p at T = 1, exact
    kept_mass = log_kept.exp().sum(1)  # (N,)
    tail_mass = (1.0 - kept_mass).clamp_min(_TINY)
    if temperature == 1.0:  # the teacher's own probabilities (normalised: stored values round)
        log_z = (kept_mass + tail_mass).log()
        return (log_kept - log_z[:, None]).float(), (tail_mass.log() - log_z).float()
    scaled = values / temperature
    t_tail = lse + torch.log(tail_mass / (t.vocab - k))  # (N,) each tail class's logit
    tail = t_tail / temperature + math.log(t.vocab - k)  # (N,) the bucket's scaled log-weight
    log_z = torch.logsumexp(torch.cat([scaled, tail[:, None]], 1), 1)  # (N,)
    return (scaled - log_z[:, None]).float(), (tail - log_z).float()


def _buckets(log_kept: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    return torch.cat([log_kept, log_tail[:, None]], 1)  # (N, k + 1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) per row, with 0 log 0 = 0 (an empty tail)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(1)


def kl_tail(student: torch.Tensor, t: TokenTargets, temperature: float) -> torch.Tensor:
    """Forward KL over the k kept classes and the tail bucket, times T^2.  # (N,)"""
    p_kept, p_tail = teacher_buckets(t, temperature)
    return _BucketKL.apply(student, t.indices.long(), p_kept, p_tail, temperature)


class _BucketKL(torch.autograd.Function):
    """`kl_tail` with its gradient written out (autograd through the bucketing took most of a
    small student's step). With z = s / T and q = softmax(z): dKL/dz_v = q_v - p_v on a kept
    class v, and q_v (1 - p_tail / q_tail) on a tail class (the teacher's tail mass spread as
    the student spreads its own); the loss is T^2 KL, so the gradient in s is T times that.
    Forward: one softmax and one sum over the (N, V) logits; backward: one product."""

    @staticmethod
    def forward(ctx, student, idx, p_kept, p_tail, temperature):  # (N, V), (N, k), (N, k), (N,)
        z = student.float() / temperature if temperature != 1.0 else student.float()
        q = F.softmax(z, 1)  # (N, V); softmax is one fused pass, log_softmax + exp two
        q_kept = q.gather(1, idx)  # (N, k)
        s_kept = q_kept.log()
        if idx.shape[1] >= q.shape[1]:  # every class kept: no tail
            s_tail = torch.full_like(q_kept[:, 0], float("-inf"))
            low = s_kept.amin(1) < -80.0
        else:
            s_tail = q.scatter_(1, idx, 0.0).sum(1).log()  # (N,) q now holds the tail only
            # A kept probability below e^-80 nears float32's subnormals, and so may a tail
            # below e^-50 (V terms, each under 1.2e-38, could be 1e-7 of it at V = 2^31):
            # those rows are redone in logs.
            low = (s_kept.amin(1) < -80.0) | (s_tail < -50.0)  # amin: a bool any(1) is slow
        any_low = bool(low.any())
        if any_low:
            log_q = F.log_softmax(z[low], 1)
            s_kept[low] = log_q.gather(1, idx[low])
            if idx.shape[1] < q.shape[1]:
                s_tail[low] = _outside_lse(log_q, idx[low])
            ctx.low = low
        ctx.save_for_backward(q, q_kept, idx, p_kept, p_tail, s_tail, z if any_low else None)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return temperature**2 * _kl(_buckets(p_kept, p_tail), _buckets(s_kept, s_tail))

    @staticmethod
    def backward(ctx, grad):  # (N,)
        q, q_kept, idx, p_kept, p_tail, s_tail, z = ctx.saved_tensors
        scale = ctx.temperature * grad  # (N,)
        has_tail = ~p_tail.isneginf()
        ratio = torch.where(has_tail, (p_tail - s_tail).exp(), torch.zeros_like(p_tail))
        out = q * (scale * (1.0 - ratio))[:, None]  # (N, V): the tail classes (kept ones are 0)
        out.scatter_(1, idx, (q_kept - p_kept.exp()) * scale[:, None])  # the kept classes
        if z is not None:  # the low rows again, in logs: q_v / q_tail without underflow
            low = ctx.low
            log_q = F.log_softmax(z[low], 1)
            tail = log_q - (s_tail[low] - p_tail[low])[:, None]  # log(q_v p_tail / q_tail)
            rows = log_q.exp() - torch.where(has_tail[low, None], tail.exp(), 0.0)
            rows.scatter_(1, idx[low], q_kept[low] - p_kept[low].exp())
            out[low] = rows * scale[low, None]
        return out.to(ctx.dtype), None, None, None, None


def _outside_lse(log_q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp (N,) of log_q (N, V) outside the classes `idx` (N, k < V), shifted by
    its largest term (constant for the gradient: that of logsumexp, in one composite pass)."""
    outside = log_q.scatter(1, idx, float("-inf"))  # (N, V), kept classes removed
    top = outside.detach().amax(1, keepdim=True)  # (N, 1), finite: some class is outside
    return (outside - top).exp().sum(1).log() + top[:, 0]


def kl_topk(student: torch.Tensor, t: TokenTargets, temperature: float) -> torch.Tensor:
    """Forward KL with both sides renormalised over the kept classes, times T^2.  # (N,)"""
    if t.values is None:
        raise PipelineError("kl-topk needs the kept classes' values")
    s = student.float().gather(1, t.indices.long()) / temperature  # (N, k)
    p = t.values.float() / temperature
    return temperature**2 * _kl(p.log_softmax(1), s.log_softmax(1))


def reverse_kl_tail(student: torch.Tensor, t: TokenTargets, temperature: float) -> torch.Tensor:
    """KL(q_T || p_T) over the k kept classes and the tail bucket, times T^2.  # (N,)"""
    s_kept, s_tail = student_buckets(student, t.indices, temperature)
    p_kept, p_tail = teacher_buckets(t, temperature)
    return temperature**2 * _kl(_buckets(s_kept, s_tail), _buckets(p_kept, p_tail))


def jsd_tail(
    student: torch.Tensor, t: TokenTargets, temperature: float, beta: float = 0.5
) -> torch.Tensor:
    """Generalised JSD beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q,
    over the k kept classes and the tail bucket, times T^2.  # (N,)"""
    if not 0.0 < beta < 1.0:
        raise PipelineError(f"jsd: beta {beta}: expected a number in (0, 1)")
    log_q = _buckets(*student_buckets(student, t.indices, temperature))
    log_p = _buckets(*teacher_buckets(t, temperature))
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return temperature**2 * (beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m))


def kl_sampled(student: torch.Tensor, t: TokenTargets, temperature: float) -> torch.Tensor:
    """KL(p_hat || q_T) from drawn classes, times T^2 (unbiased gradient at T = Tp; see the
    module doc).  # (N,)"""
    if t.counts is None:
        raise PipelineError("kl-sampled needs sampled targets (counts)")
    counts = t.counts.double()  # (N, K), 0 pads
    weight = counts
    if temperature != t.proposal_temperature:
        if t.values is None:
            raise PipelineError(
                f"sampled targets drawn at T = {t.proposal_temperature} train at another T "
                f"({temperature}) only with the drawn classes' values (precompute-logits "
                "--sample-values)"
            )
        v = t.values.double()
        log_w = v / temperature - v / t.proposal_temperature
        log_w = torch.where(counts > 0, log_w, torch.full_like(log_w, float("-inf")))
        weight = counts * torch.exp(log_w - log_w.max(1, keepdim=True).values)
    p_hat = weight / weight.sum(1, keepdim=True)  # (N, K)
    log_q = torch.log_softmax(student.float() / temperature, 1).gather(1, t.indices.long())
    safe = torch.where(p_hat > 0, p_hat, torch.ones_like(p_hat))
    terms = torch.where(p_hat > 0, p_hat * (safe.log() - log_q.double()), torch.zeros_like(p_hat))
    return (temperature**2 * terms.sum(1)).float()


TokenLoss = Callable[..., torch.Tensor]  # (student (N, V), targets, T, **settings) → (N,)

TOKEN_LOSSES: dict[str, TokenLoss] = {
    "kl": kl_tail,
    "kl-topk": kl_topk,
    "reverse-kl": reverse_kl_tail,
    "jsd": jsd_tail,
    "kl-sampled": kl_sampled,
}


def list_token_losses() -> list[str]:
    return sorted(TOKEN_LOSSES)


def token_settings(name: str, given: list[tuple[str, str, Any]]) -> dict[str, float]:
    """The settings of token loss `name`: alpha (the weight of the distillation term, 1 -
    alpha on cross-entropy), and jsd's beta; defaults overlaid by `given` (where, key, value)
    triples, each checked and named by `where` in errors."""
    from pipeline.student.losses import Setting

    table = {"alpha": Setting(0.5, 0.0, 1.0)}
    if name == "jsd":
        table["beta"] = Setting(0.5, 0.01, 0.99)
    values = {k: s.default for k, s in table.items()}
    for where, key, value in given:
        if key not in table:
            raise PipelineError(
                f"{where}: token loss {name} has no setting '{key}' (its settings: "
                f"{', '.join(table)})"
            )
        values[key] = table[key].check(value, where)
    return values


def token_loss(
    name: str,
    student: torch.Tensor,
    targets: TokenTargets,
    temperature: float,
    **settings: float,
) -> torch.Tensor:
    """Loss `name` averaged over the N distilled tokens: student logits (N, V) at those
    positions (`masked` gathers them from (B, L, V)), their sparse `targets`."""
    if name not in TOKEN_LOSSES:
        raise PipelineError(f"token loss {name!r}: expected one of {list_token_losses()}")
    if targets.sampled != (name == "kl-sampled"):
        kind = "sampled" if targets.sampled else "top-k"
        raise PipelineError(f"token loss {name!r} does not read {kind} targets")
    _check(student, targets, temperature)
    if len(student) == 0:
        return student.sum() * 0.0  # no distilled token in the batch: no signal, no NaN
    return TOKEN_LOSSES[name](student, targets, temperature, **settings).mean()


def masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits (N, V) of the distilled positions of (B, L, V) `logits`, where `mask` (B, L)
    is true, in row-major order: the order a per-token cache stores its targets in."""
    if mask.shape != logits.shape[:2]:
        raise PipelineError(f"mask {tuple(mask.shape)} for logits {tuple(logits.shape)}")
    return logits[mask.bool()]
