"""Token losses from sparse targets, each against the dense formula written out here in float64:
equal at k = V (value and gradient, at several T), and equal to what each claims to compute at
k < V (the bucketed or renormalised divergence)."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.student.token_losses import (
    TokenTargets,
    list_token_losses,
    masked,
    teacher_buckets,
    token_loss,
)

V = 50
TEMPERATURES = (1.0, 2.0, 4.0)


def logits(n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g, dtype=torch.float64) * scale  # (N, V)


def topk(teacher: torch.Tensor, k: int) -> TokenTargets:
    values, indices = teacher.float().topk(k, 1)
    return TokenTargets(indices, V, values, torch.logsumexp(teacher, 1).float())


def dense_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.xlogy(p, p).sum(1) - (p * q.log()).sum(1)  # (N,)


def dense(name: str, t: torch.Tensor, s: torch.Tensor, T: float) -> torch.Tensor:
    """The dense loss: T^2 times the divergence between softmax(t / T) and softmax(s / T)."""
    p, q = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    if name in ("kl", "kl-topk", "kl-sampled"):
        d = dense_kl(p, q)
    elif name == "reverse-kl":
        d = dense_kl(q, p)
    else:  # jsd, beta = 0.5
        m = 0.5 * (p + q)
        d = 0.5 * dense_kl(p, m) + 0.5 * dense_kl(q, m)
    return T**2 * d.mean()


def loss_and_grad(name, student, targets, T, **settings):
    s = student.clone().float().requires_grad_(True)
    loss = token_loss(name, s, targets, T, **settings)
    loss.backward()
    return loss.double(), s.grad.double()


def dense_and_grad(name, teacher, student, T):
    s = student.clone().requires_grad_(True)
    loss = dense(name, teacher, s, T)
    loss.backward()
    return loss, s.grad


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("name", ["kl", "kl-topk", "reverse-kl", "jsd"])
def test_at_k_equal_v_every_loss_is_the_dense_one(name, T):
    teacher, student = logits(16, 0), logits(16, 1)
    got, grad = loss_and_grad(name, student, topk(teacher, V), T)
    want, want_grad = dense_and_grad(name, teacher, student, T)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def bucketed(p: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(N, k + 1): the kept classes' probabilities and the rest summed."""
    kept = p.gather(1, indices)
    return torch.cat([kept, (1 - kept.sum(1, keepdim=True)).clamp_min(0)], 1)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_kl_at_t1_is_the_exact_kl_of_the_bucketed_distributions(k):
    teacher, student = logits(32, 2), logits(32, 3)
    targets = topk(teacher, k)
    idx = targets.indices.long()
    p, q = bucketed(torch.softmax(teacher, 1), idx), bucketed(torch.softmax(student, 1), idx)
    got = token_loss("kl", student.float(), targets, 1.0).double()
    assert torch.allclose(got, dense_kl(p, q).mean(), rtol=1e-4)
    # Merging classes only lowers a divergence: a lower bound of the full KL.
    assert got <= dense("kl", teacher, student, 1.0) + 1e-6


def equal_tail_teacher(n: int, seed: int, k: int) -> torch.Tensor:
    """Logits (N, V) whose classes outside the top k share one logit: the tail rule is exact."""
    top = logits(n, seed).topk(k, 1).values  # (N, k)
    return torch.cat([top, (top[:, -1:] - 2.0).expand(-1, V - k)], 1)


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("name", ["kl", "reverse-kl", "jsd"])
def test_with_equal_tail_logits_the_tail_rule_is_exact_at_every_t(name, T):
    """The one approximation (every tail class gets the log-mean-exp logit) is exact when the
    tail logits are equal: then every bucketed loss matches the bucketed dense one."""
    k = 6
    teacher, student = equal_tail_teacher(24, 4, k), logits(24, 5)
    targets = topk(teacher, k)
    idx = targets.indices.long()
    p = bucketed(torch.softmax(teacher / T, 1), idx)
    q = bucketed(torch.softmax(student / T, 1), idx)
    want = {"kl": dense_kl(p, q), "reverse-kl": dense_kl(q, p)}
    m = 0.5 * (p + q)
    want["jsd"] = 0.5 * dense_kl(p, m) + 0.5 * dense_kl(q, m)
    got = token_loss(name, student.float(), targets, T).double()
    assert torch.allclose(got, T**2 * want[name].mean(), rtol=1e-4, atol=1e-7)


def bucketed_kl_and_grad(targets, student, T):
    """T^2 KL between the teacher's buckets at T (`teacher_buckets`, from the stored targets)
    and the bucketed softmax(s / T), and its gradient in s, by autograd in float64."""
    s = student.clone().requires_grad_(True)
    idx = targets.indices.long()
    p = torch.cat([t.double().reshape(len(s), -1) for t in teacher_buckets(targets, T)], 1).exp()
    log_q = torch.log_softmax(s / T, 1)
    kept = log_q.gather(1, idx)
    tail = log_q.scatter(1, idx, float("-inf")).logsumexp(1, keepdim=True)
    terms = torch.xlogy(p, p) - p * torch.cat([kept, tail], 1)
    loss = T**2 * torch.where(p > 0, terms, 0.0).sum(1).mean()  # no tail at k = V: 0, not NaN
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 6, 49])
def test_kl_gradient_below_k_equal_v_is_the_bucketed_kls(k, T):
    """kl's gradient is written out (not autograd): equal to autograd's through the bucketed
    formula in float64 (the teacher's buckets: test_with_equal_tail_logits...)."""
    teacher, student = equal_tail_teacher(24, 20, k), logits(24, 21)
    targets = topk(teacher, k)
    got, grad = loss_and_grad("kl", student, targets, T)
    want, want_grad = bucketed_kl_and_grad(targets, student, T)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [5, V])
def test_kl_with_probabilities_that_float32_cannot_hold_is_exact(k):
    """A student sure of the teacher's top classes puts e^-150 on the tail, and one sure
    against them e^-150 on a kept class (0 in float32 probabilities): the loss and gradient
    come from logs there, finite and equal to float64's."""
    teacher, student = logits(9, 22), logits(9, 23)
    targets = topk(teacher, k)
    idx = targets.indices.long()
    sure = student.scatter(1, idx[:, :5], student.gather(1, idx[:, :5]) + 150.0)
    student[0::3] = sure[0::3]  # rows 0, 3, 6: the tail (or the other kept classes) at e^-150
    student[1::3, idx[1::3, 0]] -= 150.0  # rows 1, 4, 7: the teacher's top class at e^-150
    got, grad = loss_and_grad("kl", student, targets, 1.0)
    want, want_grad = bucketed_kl_and_grad(targets, student, 1.0)
    assert torch.isfinite(grad).all() and want > 5  # log q ~ -150 where p is not small
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_kl_gives_a_bf16_student_a_bf16_gradient_of_the_float32_loss():
    teacher, student = logits(8, 25), logits(8, 26)
    targets = topk(teacher, 4)
    s16 = student.bfloat16().requires_grad_(True)
    token_loss("kl", s16, targets, 2.0).backward()
    _, want = loss_and_grad("kl", s16.detach().double(), targets, 2.0)
    assert s16.grad.dtype == torch.bfloat16
    assert torch.allclose(s16.grad.double(), want, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_kl_topk_is_the_kl_renormalised_over_the_kept_classes(T):
    teacher, student = logits(16, 6), logits(16, 7)
    targets = topk(teacher, 8)
    idx = targets.indices.long()
    p = torch.softmax(teacher / T, 1).gather(1, idx)
    q = torch.softmax(student / T, 1).gather(1, idx)
    want = T**2 * dense_kl(p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)).mean()
    assert torch.allclose(token_loss("kl-topk", student.float(), targets, T).double(), want)


def proportional_draws(teacher: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher whose probabilities are counts / K exactly, and those counts (every class)."""
    counts = torch.softmax(teacher, 1) * K
    counts = counts.round().clamp_min(1)  # (N, V) integers, none zero
    return counts.log(), counts  # log-counts are logits whose softmax is counts / sum


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_sampled_is_the_dense_kl_when_the_draws_are_the_distribution(T):
    raw, student = logits(8, 8), logits(8, 9)
    teacher, counts = proportional_draws(raw, 4096)
    indices = torch.arange(V).expand(8, V)
    targets = TokenTargets(indices, V, values=teacher.float(), counts=counts.long())
    got, grad = loss_and_grad("kl-sampled", student, targets, T)
    # At T = Tp = 1, p_hat = counts / K is softmax(teacher); at T = 2 the drawn classes'
    # values reweight it to softmax(teacher / 2) (self-normalised, exact with every class).
    want, want_grad = dense_and_grad("kl", teacher, student, T)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_kl_sampled_gradient_is_unbiased_at_the_proposal_temperature():
    """The mean gradient over many independent K-draws is the dense cross-entropy gradient."""
    teacher, student = logits(1, 10, 1.5), logits(1, 11)
    p = torch.softmax(teacher, 1)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.float(), 8 * 4000, replacement=True, generator=g).view(4000, 8)
    counts = torch.zeros(4000, V).scatter_add_(1, draws, torch.ones(4000, 8))  # (R, V)
    indices = torch.arange(V).expand(4000, V)
    targets = TokenTargets(indices, V, counts=counts.long())
    s = student.float().expand(4000, V).clone().requires_grad_(True)
    token_loss("kl-sampled", s, targets, 1.0).backward()
    mean_grad = s.grad.sum(0).double()  # the mean over R draws of each draw's gradient
    _, want = dense_and_grad("kl", teacher, student, 1.0)
    assert torch.allclose(mean_grad, want[0], atol=4e-3), (mean_grad - want[0]).abs().max()


def test_masked_takes_the_distilled_positions_in_row_major_order():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(masked(x, mask), torch.stack([x[0, 0], x[0, 2], x[1, 1]]))


def test_a_batch_without_distilled_tokens_gives_zero_and_a_gradient():
    s = torch.zeros(0, V, requires_grad=True)
    targets = TokenTargets(
        torch.zeros(0, 4, dtype=torch.long), V, torch.zeros(0, 4), torch.zeros(0)
    )
    loss = token_loss("kl", s, targets, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, V)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, s: (t, s[:, :-1]), "expected (N, 50)"),
        (lambda t, s: (TokenTargets(t.indices + V, V, t.values, t.lse), s), "outside [0, 50)"),
        (lambda t, s: (t, s[:-1]), "targets of (4, 3) for 3 tokens"),
    ],
)
def test_mismatched_targets_are_one_line(change, message):
    targets, student = change(topk(logits(4, 12), 3), logits(4, 13).float())
    with pytest.raises(PipelineError, match=re.escape(message)):
        token_loss("kl", student, targets, 1.0)


def test_a_loss_refuses_the_other_kind_of_targets_and_unknown_names():
    t = topk(logits(2, 14), 3)
    with pytest.raises(PipelineError, match="does not read top-k targets"):
        token_loss("kl-sampled", logits(2, 15).float(), t, 1.0)
    with pytest.raises(PipelineError, match="expected one of"):
        token_loss("kld", logits(2, 15).float(), t, 1.0)
    assert list_token_losses() == ["jsd", "kl", "kl-sampled", "kl-topk", "reverse-kl"]
