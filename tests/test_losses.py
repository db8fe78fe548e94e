"""Each loss against a reference formula written here independently, in float64 numpy with
explicit softmax, log and sums (no torch.nn.functional)."""

import math

import numpy as np
import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.student.losses import LOSSES, bind_loss, get_loss, loss_settings

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
    if name == "dkd":  # the paper's equations: no warm-up (tested on its own below)
        weights.setdefault("warmup", 0)
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
        settings = loss_settings(name, **({"warmup": 0} if name == "dkd" else {}))
        loss = bind_loss(name, 2.0, settings)(student, torch.from_numpy(t), y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all(), name


def test_dkd_gradients_stay_finite_on_confident_logits():
    s = torch.tensor([[60.0, -60.0, 0.0], [0.0, 0.0, 90.0]], dtype=torch.float32)
    t = torch.tensor([[80.0, -50.0, 1.0], [1.0, 2.0, 70.0]])
    s.requires_grad_()
    loss = bind_loss("dkd", 1.0, loss_settings("dkd"))(s, t, torch.tensor([0, 2]), epoch=0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_weights_default_to_the_papers_and_are_validated():
    assert loss_settings("kd") == {"alpha": 0.9}
    assert loss_settings("dkd") == {"alpha": 1.0, "beta": 8.0, "warmup": 20.0}  # mdistiller
    assert loss_settings("dist") == {"beta": 2.0, "gamma": 2.0}  # DIST's released configs
    assert loss_settings("dist", beta=1.0) == {"beta": 1.0, "gamma": 2.0}
    with pytest.raises(PipelineError, match="--warmup must be a whole number, got 2.5"):
        loss_settings("dkd", warmup=2.5)
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
        f"unknown loss 'hinton' (valid: {', '.join(sorted(LOSSES))}, or package.module:function; "
        "for sequence data: kl, kl-topk, reverse-kl, jsd, kl-sampled)"
    )


# ------------------------------------------------------------------ worked examples
# Each loss on tiny tensors written out, against the references' own code path re-written
# here in plain float64 torch (RepDistiller, mdistiller, DIST's dist_kd.py) and, where the
# numbers allow, a closed form. Every row is labelled, as in the references.

F64 = torch.float64
LN3 = math.log(3.0)
# Three classes, two rows: the batch the reference paths are checked on.
S3 = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=F64)
T3 = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 4.0]], dtype=F64)
Y3 = torch.tensor([1, 2])
# One row, two classes, T = 2: softmax(t/T) = [3/4, 1/4], softmax(s/T) = [1/2, 1/2], so
# T²·KL = 4·(3/4·ln 3 - ln 2) = ln(27/16); CE(s, y=0) = ln 2.
S1 = torch.tensor([[0.0, 0.0]], dtype=F64)
T1 = torch.tensor([[2 * LN3, 0.0]], dtype=F64)
Y1 = torch.tensor([0])


def bound(name, T, **settings):
    return bind_loss(name, T, loss_settings(name, **settings))


def reference_kd_term(s, t, T):
    """RepDistiller's DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) · T² / B."""
    p_s = torch.log_softmax(s / T, dim=1)
    p_t = torch.softmax(t / T, dim=1)
    return torch.nn.functional.kl_div(p_s, p_t, reduction="sum") * T**2 / s.shape[0]


def test_kd_and_soft_worked_example():
    assert bound("soft", 2.0)(S1, T1, Y1).item() == pytest.approx(math.log(27 / 16), rel=1e-14)
    kd = bound("kd", 2.0, alpha=0.9)(S1, T1, Y1).item()
    assert kd == pytest.approx(0.1 * math.log(2) + 0.9 * math.log(27 / 16), rel=1e-14)
    # mdistiller's KD: CE_WEIGHT 0.1 · CE + KD_WEIGHT 0.9 · DistillKL, i.e. alpha 0.9 here.
    want = 0.1 * torch.nn.functional.cross_entropy(S3, Y3) + 0.9 * reference_kd_term(S3, T3, 4.0)
    assert bound("kd", 4.0, alpha=0.9)(S3, T3, Y3).item() == pytest.approx(want.item(), rel=1e-13)
    soft = bound("soft", 4.0)(S3, T3, Y3).item()
    assert soft == pytest.approx(reference_kd_term(S3, T3, 4.0).item(), rel=1e-13)


def test_mse_worked_example():
    """Differences 1, 2, -1, -2: mean square 2.5; both rows' CE is ln(1 + e)."""
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=F64)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    y = torch.tensor([0, 1])
    assert bound("mse", 4.0)(s, t, y).item() == pytest.approx(2.5, rel=1e-15)
    got = bound("mse", 4.0, alpha=0.5)(s, t, y).item()
    assert got == pytest.approx(0.5 * math.log(1 + math.e) + 0.5 * 2.5, rel=1e-14)
    assert torch.nn.functional.mse_loss(s, t).item() == 2.5  # the reference: a plain MSE


def reference_dkd(s, t, y, alpha, beta, T, epoch, warmup):
    """mdistiller's DKD.forward_train and dkd_loss, re-written: CE + min(epoch / warmup, 1) ·
    (alpha·TCKD + beta·NCKD), `epoch` 1-based; NCKD masks the target with -1000."""
    gt = torch.zeros_like(s).scatter_(1, y[:, None], 1).bool()
    other = ~gt

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

    p_s = cat_mask(torch.softmax(s / T, dim=1))
    p_t = cat_mask(torch.softmax(t / T, dim=1))
    kl = torch.nn.functional.kl_div
    tckd = kl(torch.log(p_s), p_t, reduction="sum") * T**2 / len(y)
    p_t2 = torch.softmax(t / T - 1000.0 * gt, dim=1)
    log_p_s2 = torch.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = kl(log_p_s2, p_t2, reduction="sum") * T**2 / len(y)
    ce = torch.nn.functional.cross_entropy(s, y)
    return ce + min(epoch / warmup, 1.0) * (alpha * tckd + beta * nckd)


def test_dkd_worked_example_and_mdistiller_warmup():
    # Two classes: NCKD (one non-target class) is 0 and TCKD is the plain KL, ln(27/16) at T = 2.
    plain = bound("dkd", 2.0, warmup=0)(S1, T1, Y1).item()  # warmup 0: the paper's equations
    assert plain == pytest.approx(math.log(27 / 8), rel=1e-14)
    early = bound("dkd", 2.0, warmup=4)(S1, T1, Y1, epoch=0).item()  # 0-based: weight 1/4
    assert early == pytest.approx(math.log(2) + 0.25 * math.log(27 / 16), rel=1e-14)
    for epoch in (0, 4, 19, 25):  # ours 0-based, mdistiller's 1-based
        got = bound("dkd", 4.0, warmup=20)(S3, T3, Y3, epoch=epoch).item()
        want = reference_dkd(S3, T3, Y3, 1.0, 8.0, 4.0, epoch + 1, 20).item()
        assert got == pytest.approx(want, rel=1e-12), epoch
    want = reference_dkd(S3, T3, Y3, 1.0, 8.0, 4.0, 1, 1).item()  # warmup 0: never scaled
    assert bound("dkd", 4.0, warmup=0)(S3, T3, Y3).item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(PipelineError, match="dkd: warmup 20 needs the training epoch"):
        bound("dkd", 4.0, warmup=20)(S3, T3, Y3)


def reference_dist(s, t, T, beta=1.0, gamma=1.0, eps=1e-8):
    """DIST's dist_kd.py (and torchdistill's DISTLoss, with tau = T), re-written."""

    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = torch.softmax(s / T, dim=1), torch.softmax(t / T, dim=1)
    inter = T**2 * (1 - pearson(y_s, y_t).mean())
    intra = T**2 * (1 - pearson(y_s.T, y_t.T).mean())
    return beta * inter + gamma * intra


def test_dist_worked_example_and_the_released_weight():
    """p_s = [[1/4, 3/4], [3/4, 1/4]], p_t = [[3/4, 1/4], [1/4, 3/4]]: every row and column
    correlates at -1, so inter = intra = 2 and, at the default β = γ = 2, the loss is
    CE + 8 with CE = ln(4/3)."""
    s = torch.tensor([[0.0, LN3], [LN3, 0.0]], dtype=F64)
    t = torch.tensor([[LN3, 0.0], [0.0, LN3]], dtype=F64)
    y = torch.tensor([1, 0])
    assert bound("dist", 1.0)(s, t, y).item() == pytest.approx(math.log(4 / 3) + 8, rel=1e-6)
    # The released recipe: 1.0 · CE + kd_loss_weight 2.0 · DIST(beta=1, gamma=1, tau=T).
    for T in (1.0, 4.0):
        want = torch.nn.functional.cross_entropy(S3, Y3) + 2.0 * reference_dist(S3, T3, T)
        assert bound("dist", T)(S3, T3, Y3).item() == pytest.approx(want.item(), rel=1e-12)


# --------------------------------------------------------- the epoch reaches the loss


def test_the_trainer_passes_the_epoch_and_a_resumed_warmup_run_ends_identical(tmp_path):
    from pipeline.core.config import OptimConfig
    from pipeline.core.training import TrainData, Trainee, fit_many
    from pipeline.student.losses import EpochLoss
    from pipeline.student.targets import MemoryTargets

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(24, 5)).astype(np.float32))
    logits = rng.normal(0, 3, (24, 3)).astype(np.float32)
    data = TrainData(x, torch.arange(24) % 3, MemoryTargets(logits))
    seen: list[int] = []
    spec = get_loss("dkd")
    dkd = spec.fn

    def spy(student, teacher, labels, *, epoch, **settings):
        seen.append(epoch)
        return dkd(student, teacher, labels, epoch=epoch, **settings)

    def make(checkpoint, warmup=3.0, fn=None):
        torch.manual_seed(0)
        settings = {"alpha": 1.0, "beta": 8.0, "warmup": warmup}
        loss = (
            spec.bind(2.0, settings) if fn is None else EpochLoss(fn, temperature=2.0, **settings)
        )
        net = torch.nn.Linear(5, 3)
        return Trainee("s", net, loss, OptimConfig("sgd", 0.1), teacher=lambda b: b.logits,
                       checkpoint=checkpoint)  # fmt: skip

    assert isinstance(make(None).loss_fn, EpochLoss) and make(None).loss_fn.reads_epoch
    assert not getattr(bind_loss("kd", 2.0, {"alpha": 0.9}), "reads_epoch", False)
    kw = {"batch_size": 8, "seed": 0, "device": torch.device("cpu")}
    whole = make(None, fn=spy)
    fit_many([whole], data, epochs=4, **kw)
    assert seen == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3  # 3 steps an epoch, 0-based epochs

    class Killed(Exception):
        pass

    def kill_after_two(epoch: int) -> None:  # after epoch 2's checkpoint is written
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        fit_many(
            [make(tmp_path / "s.resume.pt")], data, epochs=4, on_epoch_end=kill_after_two, **kw
        )
    seen.clear()
    resumed = make(tmp_path / "s.resume.pt", fn=spy)
    fit_many([resumed], data, epochs=4, resume=True, **kw)
    assert seen == [2] * 3 + [3] * 3  # continued at epoch 2, which it read from the checkpoint
    assert torch.equal(resumed.model.weight, whole.model.weight) and resumed.log == whole.log
    no_warmup = make(None, warmup=0.0)
    fit_many([no_warmup], data, epochs=4, **kw)
    assert not torch.equal(no_warmup.model.weight, whole.model.weight)  # the ramp took effect
