"""Each loss against a reference formula written here independently, in float64 numpy with
explicit softmax, log and sums (no torch.nn.functional)."""

import math

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.losses import LOSSES, bind_loss, get_loss, loss_settings

B, C = 7, 5


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_ce(s: np.ndarray, y: np.ndarray) -> float:
    """Mean over labelled rows of -log softmax(s)[y]; 0 without labelled rows."""
    rows = [i for i in range(len(y)) if y[i] >= 0]
    if not rows:
        return 0.0
    p = softmax(s)
    return sum(-math.log(p[i, y[i]]) for i in rows) / len(rows)


def ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of sum_c p log(p / q)."""
    total = 0.0
    for i in range(len(p)):
        total += sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(p.shape[1]))
    return total / len(p)


def ref_kd(s, t, y, T, a):
    return (1 - a) * ref_ce(s, y) + a * T * T * ref_kl(softmax(t / T), softmax(s / T))


def ref_soft(s, t, y, T):
    return T * T * ref_kl(softmax(t / T), softmax(s / T))


def ref_mse(s, t, y, a):
    return (1 - a) * ref_ce(s, y) + a * ((s - t) ** 2).sum() / s.size


def ref_dkd(s, t, y, T, a, b):
    """Zhao et al. 2022, eqs. (1)-(4), written out row by row."""
    ps, pt = softmax(s / T), softmax(t / T)
    tckd = nckd = 0.0
    for i in range(len(s)):
        g = y[i] if y[i] >= 0 else int(np.argmax(t[i]))
        bs = [ps[i, g], 1 - ps[i, g]]
        bt = [pt[i, g], 1 - pt[i, g]]
        tckd += sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2))
        others = [c for c in range(s.shape[1]) if c != g]
        qs = np.array([ps[i, c] for c in others]) / (1 - ps[i, g])  # renormalised non-target
        qt = np.array([pt[i, c] for c in others]) / (1 - pt[i, g])
        nckd += sum(qt[k] * math.log(qt[k] / qs[k]) for k in range(len(others)))
    n = len(s)
    return ref_ce(s, y) + T * T * (a * tckd / n + b * nckd / n)


def pearson(u: np.ndarray, v: np.ndarray) -> float:
    du, dv = u - u.mean(), v - v.mean()
    return float((du * dv).sum() / (math.sqrt((du**2).sum()) * math.sqrt((dv**2).sum())))


def ref_dist(s, t, y, T, b, g):
    """Huang et al. 2022: 1 - mean Pearson over rows (inter) and over columns (intra)."""
    ps, pt = softmax(s / T), softmax(t / T)
    inter = 1 - np.mean([pearson(ps[i], pt[i]) for i in range(len(s))])
    intra = 1 - np.mean([pearson(ps[:, c], pt[:, c]) for c in range(s.shape[1])])
    return ref_ce(s, y) + T * T * (b * inter + g * intra)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, (B, C))
    t = rng.normal(0, 3, (B, C))
    y = np.array([0, 3, -1, 4, -1, 1, 2])  # two unlabelled rows
    return s, t, y


def run(name, s, t, y, T, **weights):
    fn = bind_loss(name, T, loss_settings(name, **weights))
    out = fn(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(y))
    return out.item()


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_kd_matches_reference(batch, T):
    s, t, y = batch
    for a in (0.0, 0.3, 1.0):
        assert run("kd", s, t, y, T, alpha=a) == pytest.approx(ref_kd(s, t, y, T, a), rel=1e-10)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_soft_matches_reference_and_ignores_labels(batch, T):
    s, t, y = batch
    want = ref_soft(s, t, y, T)
    assert run("soft", s, t, y, T) == pytest.approx(want, rel=1e-10)
    assert run("soft", s, t, np.full_like(y, -1), T) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("T", [0.5, 4.0])
def test_mse_matches_reference_at_any_temperature(batch, T):
    s, t, y = batch
    for a in (0.5, 1.0):
        assert run("mse", s, t, y, T, alpha=a) == pytest.approx(ref_mse(s, t, y, a), rel=1e-10)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_reference(batch, T):
    s, t, y = batch
    got = run("dkd", s, t, y, T, alpha=1.0, beta=8.0)
    assert got == pytest.approx(ref_dkd(s, t, y, T, 1.0, 8.0), rel=1e-9)
    got = run("dkd", s, t, y, T, alpha=0.5, beta=2.0)
    assert got == pytest.approx(ref_dkd(s, t, y, T, 0.5, 2.0), rel=1e-9)


def test_dkd_tckd_plus_nckd_decomposes_kd(batch):
    """The paper's identity: KD = TCKD + (1 - p_t^target) · NCKD, per row."""
    s, t, y = batch
    T = 2.0
    for i in range(B):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        g = yi[0] if yi[0] >= 0 else int(np.argmax(ti[0]))
        pt = softmax(ti / T)[0, g]
        tckd = run("dkd", si, ti, yi, T, alpha=1.0, beta=0.0) - ref_ce(si, yi)
        nckd = run("dkd", si, ti, yi, T, alpha=0.0, beta=1.0) - ref_ce(si, yi)
        kd = run("soft", si, ti, yi, T)
        assert kd == pytest.approx(tckd + (1 - pt) * nckd, rel=1e-9)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_matches_reference(batch, T):
    s, t, y = batch
    got = run("dist", s, t, y, T, beta=1.0, gamma=1.0)
    assert got == pytest.approx(ref_dist(s, t, y, T, 1.0, 1.0), rel=1e-6)
    got = run("dist", s, t, y, T, beta=2.0, gamma=0.5)
    assert got == pytest.approx(ref_dist(s, t, y, T, 2.0, 0.5), rel=1e-6)


def test_ce_ignores_the_teacher(batch):
    s, t, y = batch
    assert run("ce", s, t, y, 4.0) == pytest.approx(ref_ce(s, y), rel=1e-12)
    fn = bind_loss("ce", 1.0, {})
    assert fn(torch.from_numpy(s), None, torch.from_numpy(y)).item() == pytest.approx(
        ref_ce(s, y), rel=1e-12
    )


def test_a_batch_without_labels_keeps_the_graph_and_no_nan(batch):
    s, t, _ = batch
    y = torch.full((B,), -1)
    for name in ("kd", "mse", "dkd", "dist"):
        student = torch.from_numpy(s).requires_grad_()
        loss = bind_loss(name, 2.0, loss_settings(name))(student, torch.from_numpy(t), y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all(), name


def test_dkd_gradients_stay_finite_on_confident_logits():
    s = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 90.0]], dtype=torch.float32)
    t = torch.tensor([[80.0, -50.0, 1.0], [1.0, 2.0, 70.0]])
    s.requires_grad_()
    loss = bind_loss("dkd", 1.0, loss_settings("dkd"))(s, t, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_weights_default_to_the_papers_and_are_validated():
    assert loss_settings("kd") == {"alpha": 0.9}
    assert loss_settings("dkd") == {"alpha": 1.0, "beta": 8.0}
    assert loss_settings("dist", beta=2.0) == {"beta": 2.0, "gamma": 1.0}
    with pytest.raises(PipelineError, match=r"--alpha: loss soft has no setting 'alpha'"):
        loss_settings("soft", alpha=0.5)  # soft takes no setting: refused, not dropped
    with pytest.raises(PipelineError, match=r"--alpha must be a finite number, got nan"):
        loss_settings("kd", alpha=float("nan"))
    with pytest.raises(PipelineError, match=r"--alpha must be in \[0, 1\], got 1.5"):
        loss_settings("kd", alpha=1.5)
    with pytest.raises(PipelineError, match="--beta must be >= 0, got -1"):
        loss_settings("dkd", beta=-1)
    with pytest.raises(PipelineError, match="--temperature must be > 0"):
        bind_loss("kd", 0.0, {"alpha": 0.5})


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(PipelineError) as e:
        get_loss("hinton")
    assert str(e.value) == (
        f"unknown loss 'hinton' (valid: {', '.join(sorted(LOSSES))}, or package.module:function)"
    )
