"""Each feature loss against a reference formula written here independently: float64 numpy with
explicit loops and sums (no torch.nn.functional), on small seeded tensors."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.student import feature_losses as fl
from pipeline.student.feature_losses import (
    at_loss,
    attention,
    fitnet_loss,
    fsp_loss,
    fsp_matrix,
    get_feature_loss,
    grad_at_loss,
    input_grads,
    list_feature_losses,
    make_projections,
    make_regressor,
    nst_loss,
    sobolev_loss,
    student_input_grads,
)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def t64(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def one_line_naming(err: pytest.ExceptionInfo, *parts: object) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)


# ------------------------------------------------------------------------- references


def ref_map(a: np.ndarray, p: float = 2.0) -> np.ndarray:
    """(B, C, H, W) -> (B, H, W): mean over channels of |a|^p, by loops."""
    b, c, h, w = a.shape
    out = np.zeros((b, h, w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                out[i, y, x] = sum(abs(a[i, k, y, x]) ** p for k in range(c)) / c
    return out


def ref_normalise(m: np.ndarray) -> np.ndarray:
    """(B, ...) -> (B, n): each row flattened and divided by its L2 norm."""
    flat = m.reshape(len(m), -1)
    return np.stack([row / math.sqrt(sum(v * v for v in row)) for row in flat])


def ref_avgpool(m: np.ndarray, k: int) -> np.ndarray:
    """(B, H, W) -> (B, H/k, W/k): mean of each k×k block."""
    b, h, w = m.shape
    out = np.zeros((b, h // k, w // k))
    for i in range(b):
        for y in range(h // k):
            for x in range(w // k):
                out[i, y, x] = m[i, y * k : y * k + k, x * k : x * k + k].sum() / (k * k)
    return out


def ref_mean_sq(a: np.ndarray, b: np.ndarray) -> float:
    d = (a - b).ravel()
    return sum(v * v for v in d) / d.size


def ref_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# ----------------------------------------------------------------------------- registry


def test_registry_lists_each_loss_with_its_kind_weight_and_paper():
    assert list_feature_losses() == ["at", "fitnet", "nst", "fsp", "sobolev", "grad-at"]
    assert list_feature_losses(kind="hint") == ["fitnet", "nst"]
    kinds = {n: get_feature_loss(n).kind for n in list_feature_losses()}
    assert kinds["at"] == "attention" and kinds["sobolev"] == "input-grad"
    assert kinds["fsp"] == "fsp" and kinds["grad-at"] == "grad-attention"
    for name in list_feature_losses():
        spec = get_feature_loss(name)
        assert "weight" in spec.settings and spec.paper and spec.summary and spec.student
    assert get_feature_loss("fitnet").regressor and not get_feature_loss("at").regressor
    with pytest.raises(PipelineError) as err:
        get_feature_loss("attention")
    one_line_naming(err, "attention", "at, fitnet")


def test_registering_a_name_again_warns_and_a_loss_without_weight_is_refused():
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                fl.register_feature_loss("toy", kind="hint", settings={"weight": fl.Setting(1.0)})(
                    lambda s, t: (s - t).sum()
                )
        assert any("registered again" in str(w.message) for w in caught)
    finally:
        fl.FEATURE_LOSSES.pop("toy", None)
    with pytest.raises(ValueError, match="weight"):
        fl.register_feature_loss("toy", kind="hint", settings={})
    with pytest.raises(ValueError, match="kind"):
        fl.register_feature_loss("toy", kind="logits", settings={"weight": fl.Setting(1.0)})


# ----------------------------------------------------------------------------------- at


def test_attention_is_the_normalised_channel_mean_of_abs_power():
    a = rand(2, 3, 4, 5, seed=1)
    for p in (1.0, 2.0, 3.0):
        want = ref_normalise(ref_map(a, p))
        np.testing.assert_allclose(attention(t64(a), p).numpy(), want, rtol=1e-12)


def test_at_matches_reference_summed_over_layers():
    students = [rand(3, 4, 4, 4, seed=2), rand(3, 6, 2, 2, seed=3)]
    teachers = [rand(3, 8, 4, 4, seed=4), rand(3, 5, 2, 2, seed=5)]
    maps_t = [ref_normalise(ref_map(t)) for t in teachers]  # what stage one caches
    want = sum(
        ref_mean_sq(ref_normalise(ref_map(s)), q_t) for s, q_t in zip(students, maps_t, strict=True)
    )
    got = at_loss([t64(s) for s in students], [t64(q) for q in maps_t], p=2.0)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # A single layer may be given as a tensor; cached maps may keep their (H, W) shape.
    one = at_loss(t64(students[0]), t64(maps_t[0].reshape(3, 4, 4)))
    assert one.item() == pytest.approx(ref_mean_sq(ref_normalise(ref_map(students[0])), maps_t[0]))


def ref_avgpool_channels(a: np.ndarray, k: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C, H/k, W/k): each channel's k×k blocks averaged."""
    return np.stack([ref_avgpool(a[:, c], k) for c in range(a.shape[1])], 1)


def test_at_pools_the_larger_students_activation_and_refuses_a_larger_teacher():
    s, t = rand(2, 3, 8, 8, seed=6), rand(2, 5, 4, 4, seed=7)
    q_t = ref_normalise(ref_map(t)).reshape(2, 4, 4)
    want = ref_mean_sq(ref_normalise(ref_map(ref_avgpool_channels(s, 2))), q_t.reshape(2, -1))
    assert at_loss(t64(s), t64(q_t)).item() == pytest.approx(want, rel=1e-12)
    # Teacher larger: the activation the references would pool is not in the cache.
    s, t = rand(2, 3, 2, 2, seed=8), rand(2, 5, 4, 4, seed=9)
    with pytest.raises(PipelineError) as err:
        at_loss(t64(s), t64(ref_normalise(ref_map(t)).reshape(2, 4, 4)))
    one_line_naming(err, (2, 3, 2, 2), (2, 4, 4), "teacher's map is larger", "pipeline layers")


def test_at_weight_and_decay_give_beta_over_batch_and_positions():
    spec = get_feature_loss("at")
    settings = spec.resolve([("params.yaml:features.at.weight_decay", "weight_decay", 0.5)])
    assert spec.weight_at(settings, 0) == 1000.0
    assert spec.weight_at(settings, 3) == 125.0
    s, t = rand(4, 2, 3, 3, seed=10), rand(4, 9, seed=11)
    q_s, q_t = ref_normalise(ref_map(s)), ref_normalise(t)
    total = sum((q_s[i, j] - q_t[i, j]) ** 2 for i in range(4) for j in range(9))
    loss = spec.bind(settings, p=2.0)(t64(s), t64(q_t))
    # β / (N·H·W) per layer on the sum of squared differences, N the batch.
    assert spec.weight_at(settings, 0) * loss.item() == pytest.approx(1000 / (4 * 9) * total)


# ------------------------------------------------------------------------------- fitnet


def ref_conv(s: np.ndarray, w: np.ndarray, bias: np.ndarray, k: int) -> np.ndarray:
    """Convolution with a k×k kernel and stride k, by loops: (B, C, H, W) -> (B, O, H/k, W/k)."""
    b, c, h, wd = s.shape
    o = w.shape[0]
    out = np.zeros((b, o, h // k, wd // k))
    for i in range(b):
        for q in range(o):
            for y in range(h // k):
                for x in range(wd // k):
                    patch = s[i, :, y * k : y * k + k, x * k : x * k + k]
                    out[i, q, y, x] = (patch * w[q]).sum() + bias[q]
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_fitnet_matches_reference(k):
    s, h = rand(2, 3, 4, 4, seed=12), rand(2, 5, 4 // k, 4 // k, seed=13)
    reg = make_regressor((3, 4, 4), (5, 4 // k, 4 // k)).double()
    assert tuple(reg.weight.shape) == (5, 3, k, k) and reg.stride == (k, k)
    w, bias = reg.weight.detach().numpy(), reg.bias.detach().numpy()
    want = 0.5 * ref_mean_sq(ref_conv(s, w, bias, k), h)
    got = fitnet_loss(t64(s), torch.tensor(h, dtype=torch.float16), regressors=reg)
    h16 = torch.tensor(h, dtype=torch.float16).double().numpy()  # the hint as cached
    assert got.item() == pytest.approx(0.5 * ref_mean_sq(ref_conv(s, w, bias, k), h16))
    assert got.item() == pytest.approx(want, rel=1e-3)


def test_fitnet_flat_features_use_a_linear_regressor_and_sum_over_layers():
    s, h = rand(4, 6, seed=14), rand(4, 3, seed=15)
    reg = make_regressor((6,), (3,)).double()
    w, bias = reg.weight.detach().numpy(), reg.bias.detach().numpy()
    r = np.array(
        [[sum(w[o, c] * s[i, c] for c in range(6)) + bias[o] for o in range(3)] for i in range(4)]
    )
    one = 0.5 * ref_mean_sq(r, h)
    got = fitnet_loss([t64(s), t64(s)], [t64(h), t64(h)], regressors=nn.ModuleList([reg, reg]))
    assert got.item() == pytest.approx(2 * one, rel=1e-12)


def test_fitnet_signals_use_a_conv1d_regressor():
    reg = make_regressor((4, 16), (8, 4))
    assert isinstance(reg, nn.Conv1d) and reg(torch.zeros(2, 4, 16)).shape == (2, 8, 4)


@pytest.mark.parametrize(
    "student, hint",
    [
        ((16, 6, 6), (32, 4, 4)),
        ((16, 4, 4), (32, 8, 8)),
        ((16, 8, 8), (32,)),
        ((2, 16, 8, 8), (2, 32, 4, 4)),
    ],
)
def test_make_regressor_refuses_unmappable_shapes(student, hint):
    with pytest.raises(PipelineError) as err:
        make_regressor(student, hint)
    one_line_naming(err, student, hint)


def test_fitnet_refuses_a_regressor_that_does_not_fit():
    reg = make_regressor((3, 4, 4), (5, 4, 4))
    with pytest.raises(PipelineError) as err:
        fitnet_loss(torch.zeros(2, 7, 4, 4), torch.zeros(2, 5, 4, 4), regressors=reg)
    one_line_naming(err, (2, 7, 4, 4), (2, 5, 4, 4))
    with pytest.raises(PipelineError, match="2 regressors for 1"):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4), regressors=[reg, reg])


# ---------------------------------------------------------------------------------- nst


def ref_nst(s: np.ndarray, t: np.ndarray, d: int = 2, c: float = 0.0) -> float:
    """Batch mean of MMD² between the L2-normalised channel maps of s and of t."""
    total = 0.0
    for i in range(len(s)):
        fs = [v / math.sqrt((v * v).sum()) for v in s[i].reshape(s.shape[1], -1)]
        ft = [v / math.sqrt((v * v).sum()) for v in t[i].reshape(t.shape[1], -1)]

        def k(x, y):
            return (sum(x[j] * y[j] for j in range(len(x))) + c) ** d

        ss = sum(k(a, b) for a in fs for b in fs) / len(fs) ** 2
        tt = sum(k(a, b) for a in ft for b in ft) / len(ft) ** 2
        st = sum(k(a, b) for a in fs for b in ft) / (len(fs) * len(ft))
        total += ss + tt - 2 * st
    return total / len(s)


def test_nst_matches_reference():
    s, t = rand(3, 4, 3, 3, seed=16), rand(3, 6, 3, 3, seed=17)
    assert nst_loss(t64(s), t64(t)).item() == pytest.approx(ref_nst(s, t), rel=1e-10)
    spec = get_feature_loss("nst")
    settings = spec.resolve([("--feature-arg", "degree", 3), ("--feature-arg", "c", 0.5)])
    got = spec.bind(settings)(t64(s), t64(t))
    assert got.item() == pytest.approx(ref_nst(s, t, 3, 0.5), rel=1e-10)
    assert nst_loss(t64(t), t64(t)).item() == pytest.approx(0.0, abs=1e-12)


def test_nst_pools_the_larger_side_and_sums_layers():
    s, t = rand(2, 3, 4, 4, seed=18), rand(2, 5, 2, 2, seed=19)
    s_pooled = np.stack([ref_avgpool(s[:, c], 2) for c in range(3)], 1)  # (2, 3, 2, 2)
    assert nst_loss(t64(s), t64(t)).item() == pytest.approx(ref_nst(s_pooled, t), rel=1e-10)
    # Two layers, the second with the teacher the larger; a float16 hint is read as cached.
    t16 = torch.tensor(t, dtype=torch.float16)
    want = ref_nst(s_pooled, t16.double().numpy()) + ref_nst(t, s_pooled)
    got = nst_loss([t64(s), t64(t)], [t16, t64(s)])
    assert got.item() == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------------- fsp


def ref_fsp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n, ca, h, w = a.shape
    cb = b.shape[1]
    g = np.zeros((n, ca, cb))
    for i in range(n):
        for x in range(ca):
            for y in range(cb):
                g[i, x, y] = sum(a[i, x, r, q] * b[i, y, r, q] for r in range(h) for q in range(w))
    return g / (h * w)


def test_fsp_matches_reference_averaged_over_pairs():
    a1, b1 = rand(2, 3, 4, 4, seed=20), rand(2, 5, 4, 4, seed=21)
    a2, b2 = rand(2, 5, 2, 2, seed=22), rand(2, 4, 2, 2, seed=23)
    np.testing.assert_allclose(fsp_matrix(t64(a1), t64(b1)).numpy(), ref_fsp(a1, b1), rtol=1e-12)
    g1, g2 = rand(2, 3, 5, seed=24), rand(2, 5, 4, seed=25)  # the cached teacher matrices
    want = (ref_mean_sq(ref_fsp(a1, b1), g1) + ref_mean_sq(ref_fsp(a2, b2), g2)) / 2
    got = fsp_loss([(t64(a1), t64(b1)), (t64(a2), t64(b2))], [t64(g1), t64(g2)])
    assert got.item() == pytest.approx(want, rel=1e-12)
    one = fsp_loss((t64(a1), t64(b1)), t64(g1))
    assert one.item() == pytest.approx(ref_mean_sq(ref_fsp(a1, b1), g1), rel=1e-12)


def test_fsp_refuses_mismatched_channels_and_spatial_sizes():
    a, b = torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4)
    with pytest.raises(PipelineError) as err:
        fsp_loss((a, b), torch.zeros(2, 4, 5))
    one_line_naming(err, (2, 3, 5), (2, 4, 5))
    with pytest.raises(PipelineError) as err:
        fsp_loss((a, torch.zeros(2, 5, 2, 2)), torch.zeros(2, 3, 5))
    one_line_naming(err, (2, 3, 4, 4), (2, 5, 2, 2))


# ------------------------------------------------------------------------------ sobolev


def ref_linear_grads(x, w, bias, r, temp):
    """Input gradients of ⟨softmax((W x + b)/T), r_k⟩ for a linear model, by the chain rule:
    ∂/∂x = Wᵀ · (1/T)(p ⊙ r - p·(pᵀr)), per sample and projection: (B, K, D)."""
    out = np.zeros((len(x), len(r), x.shape[1]))
    for i in range(len(x)):
        p = ref_softmax((w @ x[i] + bias) / temp)
        for k in range(len(r)):
            dz = (p * r[k] - p * (p @ r[k])) / temp
            out[i, k] = [sum(w[c, d] * dz[c] for c in range(len(p))) for d in range(x.shape[1])]
    return out


def linear_model(seed: int, d: int = 5, c: int = 4) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def test_projections_are_seeded_unit_vectors():
    r = make_projections(3, 10, seed=7)
    assert r.shape == (3, 10) and r.dtype == torch.float32
    assert torch.equal(r, make_projections(3, 10, seed=7))
    assert not torch.equal(r, make_projections(3, 10, seed=8))
    np.testing.assert_allclose(r.norm(dim=1).numpy(), 1.0, rtol=1e-6)


def test_input_grads_and_sobolev_match_reference():
    x, temp = rand(3, 5, seed=26), 2.0
    r = make_projections(2, 4, seed=1).double()
    student, teacher = linear_model(0), linear_model(1)
    w, b = student.weight.detach().numpy(), student.bias.detach().numpy()
    want_s = ref_linear_grads(x, w, b, r.numpy(), temp)
    np.testing.assert_allclose(
        student_input_grads(student, t64(x), r, temp).detach().numpy(), want_s, rtol=1e-10
    )
    tw, tb = teacher.weight.detach().numpy(), teacher.bias.detach().numpy()
    want_t = ref_linear_grads(x, tw, tb, r.numpy(), temp)  # (B, K, D): what stage one caches
    diff = want_s - want_t
    want = sum(diff[i, k, d] ** 2 for i in range(3) for k in range(2) for d in range(5)) / (3 * 2)
    inputs = t64(x, grad=True)
    got = sobolev_loss(student(inputs), t64(want_t), inputs=inputs, projections=r, temperature=temp)
    assert got.item() == pytest.approx(want, rel=1e-10)


def tiny_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_sobolev_double_backprop_matches_finite_differences():
    x = t64(rand(2, 3, seed=27))
    r = make_projections(2, 3, seed=2).double()
    teacher = student_input_grads(tiny_mlp(1), x, r, 1.5).detach()
    model = tiny_mlp(0)

    def loss() -> torch.Tensor:
        inputs = x.clone().requires_grad_(True)
        return sobolev_loss(model(inputs), teacher, inputs=inputs, projections=r, temperature=1.5)

    loss().backward()
    weight = model[0].weight
    analytic = weight.grad.clone()
    numeric = torch.zeros_like(weight)
    eps = 1e-6
    for idx in np.ndindex(*weight.shape):
        with torch.no_grad():
            weight[idx] += eps
        up = loss().item()
        with torch.no_grad():
            weight[idx] -= 2 * eps
        down = loss().item()
        with torch.no_grad():
            weight[idx] += eps
        numeric[idx] = (up - down) / (2 * eps)
    assert analytic.abs().max() > 1e-4  # the loss does depend on the first layer
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_sobolev_is_zero_when_student_is_the_teacher():
    model, r = tiny_mlp(3), make_projections(3, 3, seed=4).double()
    x = t64(rand(4, 3, seed=28))
    teacher = student_input_grads(model, x, r, 4.0).detach()
    inputs = x.clone().requires_grad_(True)
    got = sobolev_loss(model(inputs), teacher, inputs=inputs, projections=r, temperature=4.0)
    assert got.item() == pytest.approx(0.0, abs=1e-20)


def test_sobolev_refuses_inputs_without_grad_and_mismatched_gradients():
    model, r = tiny_mlp(0), make_projections(2, 3, seed=0).double()
    x = t64(rand(2, 3))
    with pytest.raises(PipelineError, match="requires_grad_"):
        sobolev_loss(model(x), torch.zeros(2, 2, 3), inputs=x, projections=r, temperature=1.0)
    inputs = x.clone().requires_grad_(True)
    with pytest.raises(PipelineError) as err:
        sobolev_loss(
            model(inputs), torch.zeros(2, 5, 3), inputs=inputs, projections=r, temperature=1.0
        )
    one_line_naming(err, (2, 2, 3), (2, 5, 3))
    with pytest.raises(PipelineError) as err:
        input_grads(model(inputs), inputs, make_projections(2, 7, seed=0), 1.0)
    one_line_naming(err, (2, 3), (2, 7))


# ------------------------------------------------------------------------------ grad-at


def test_grad_at_matches_reference():
    """Σ_c |∂CE/∂x| of a linear model, written out: ∂CE/∂x = Wᵀ(softmax(z) - onehot(y))."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double()
    x, labels = rand(2, 2, 3, 3, seed=29), torch.tensor([1, -1])
    w, b = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    z = x.reshape(2, -1) @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.where(labels.numpy() >= 0, labels.numpy(), z.argmax(1))
    g = ((p - np.eye(4)[y]) @ w).reshape(2, 2, 3, 3)
    q_s = ref_normalise(np.abs(g).sum(1).reshape(2, -1))
    q_t = ref_normalise(rand(2, 9, seed=30))
    inputs = t64(x, grad=True)
    got = grad_at_loss(model(inputs), t64(q_t), inputs=inputs, labels=labels)
    assert got.item() == pytest.approx(ref_mean_sq(q_s, q_t), rel=1e-10)
    got.backward()  # double backprop reaches the weights
    assert model[1].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ gradients, shapes, settings


def test_gradients_reach_the_student_and_the_regressor():
    def grad_of(s: torch.Tensor) -> float:
        return s.grad.abs().sum().item()

    s = t64(rand(2, 3, 4, 4, seed=31), grad=True)
    at_loss(s, attention(t64(rand(2, 5, 4, 4, seed=32)))).backward()
    assert grad_of(s) > 0
    s = t64(rand(2, 3, 4, 4, seed=33), grad=True)
    nst_loss(s, t64(rand(2, 5, 4, 4, seed=34))).backward()
    assert grad_of(s) > 0
    a, b = t64(rand(2, 3, 4, 4, seed=35), grad=True), t64(rand(2, 2, 4, 4, seed=36), grad=True)
    fsp_loss((a, b), t64(rand(2, 3, 2, seed=37))).backward()
    assert grad_of(a) > 0 and grad_of(b) > 0
    s, reg = t64(rand(2, 3, 4, 4, seed=38), grad=True), make_regressor((3, 4, 4), (6, 2, 2))
    fitnet_loss(s, t64(rand(2, 6, 2, 2, seed=39)), regressors=reg.double()).backward()
    assert grad_of(s) > 0 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in reg.parameters()
    )


@pytest.mark.parametrize(
    "call, shapes",
    [
        (
            lambda: at_loss(torch.zeros(2, 3, 8, 4), torch.zeros(2, 4, 8)),
            [(2, 3, 8, 4), (2, 4, 8)],
        ),
        (lambda: at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 9)), [(2, 3, 4, 4), (2, 9)]),
        (lambda: at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4)), [(2, 3, 4, 4), (3, 4, 4)]),
        (lambda: at_loss(torch.zeros(2, 12), torch.zeros(2, 12)), [(2, 12), (2, 12)]),
        (
            lambda: nst_loss(torch.zeros(2, 3, 6, 2), torch.zeros(2, 3, 2, 6)),
            [(2, 3, 6, 2), (2, 3, 2, 6)],
        ),
        (
            lambda: nst_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 16)),
            [(2, 3, 4, 4), (2, 3, 16)],
        ),
    ],
)
def test_bad_shapes_are_one_line_errors_naming_both(call, shapes):
    with pytest.raises(PipelineError) as err:
        call()
    one_line_naming(err, *shapes)


def test_layer_counts_must_agree():
    with pytest.raises(PipelineError, match="2 student layers for 1 teacher"):
        at_loss([torch.zeros(2, 3, 4, 4)] * 2, [torch.zeros(2, 16)])


def test_settings_out_of_range_or_unknown_are_refused_naming_the_setting():
    spec = get_feature_loss("at")
    with pytest.raises(PipelineError) as err:
        spec.resolve([("params.yaml:features.at.weight", "weight", -1)])
    one_line_naming(err, "params.yaml:features.at.weight", ">= 0", "-1")
    with pytest.raises(PipelineError) as err:
        spec.resolve([("--feature-arg", "weight_decay", 1.5)])
    one_line_naming(err, "--feature-arg", "[0, 1]")
    with pytest.raises(PipelineError) as err:
        spec.resolve([("--feature-arg", "beta", 1.0)])
    one_line_naming(err, "no setting 'beta'", "weight, weight_decay")
    with pytest.raises(PipelineError, match="whole number"):
        get_feature_loss("fitnet").resolve([("--feature-arg", "hint_epochs", 2.5)])
    with pytest.raises(PipelineError, match="finite"):
        get_feature_loss("nst").resolve([("--feature-arg", "c", math.nan)])
    with pytest.raises(PipelineError, match=r"in \[1, 8\]"):
        get_feature_loss("nst").resolve([("--feature-arg", "degree", 0)])


def test_defaults_and_trainer_contract():
    defaults = {n: get_feature_loss(n).resolve() for n in list_feature_losses()}
    assert defaults["at"] == {"weight": 1000.0, "weight_decay": 1.0}
    assert defaults["nst"] == {"weight": 50.0, "degree": 2, "c": 0.0}
    assert defaults["fitnet"] == {"weight": 1.0, "hint_epochs": 0}
    assert get_feature_loss("fitnet").pretrain_epochs({"weight": 1.0, "hint_epochs": 3.0}) == 3
    assert get_feature_loss("fsp").pretrain_epochs(defaults["fsp"]) == 0
    # projections differ per row: bound per batch; the temperature must come from the cache
    get_feature_loss("sobolev").bind(defaults["sobolev"], temperature=4.0)
    with pytest.raises(PipelineError) as err:
        get_feature_loss("sobolev").bind(defaults["sobolev"])
    one_line_naming(err, "projections, temperature")
    with pytest.raises(PipelineError, match="p must be"):
        at_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 16), p=0.0)


# ------------------------------------------------------------------ worked examples
# Each loss on tiny tensors written out, against the references' code path re-written here in
# plain float64 torch (mdistiller's and RepDistiller's AT, NST, FSP and hint losses) and a
# value worked out by hand.

F64 = torch.float64
pool2d = torch.nn.functional.adaptive_avg_pool2d


def reference_at(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """mdistiller's single_stage_at_loss (RepDistiller's Attention.at_loss), re-written: the
    larger side's ACTIVATION is pooled to the smaller size, then A^p (no absolute value)."""

    def at(f: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(f.pow(p).mean(1).reshape(f.size(0), -1))

    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = pool2d(f_t, (s_h, s_h))
    return (at(f_s) - at(f_t)).pow(2).mean()


def test_at_worked_example_pools_the_activation_not_the_map():
    """Student 4×4 of ones but its top-left block [[2, 0], [0, 0]], teacher 2×2 of ones.
    Pooled activation [[1/2, 1], [1, 1]] -> squares [1/4, 1, 1, 1], norm 7/4 -> Q_s = [1/7,
    4/7, 4/7, 4/7]; Q_t = [1/2] * 4; mean of (5/14)², 3·(1/14)² = (28/196) / 4 = 1/28.
    Pooling the map instead gives [[1, 1], [1, 1]]: 0."""
    student = torch.ones(1, 1, 4, 4, dtype=F64)
    student[0, 0, :2, :2] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    teacher = torch.ones(1, 1, 2, 2, dtype=F64)
    cached = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]], dtype=F64)  # what stage one stores
    torch.testing.assert_close(attention(teacher), cached.reshape(1, 4))
    assert at_loss(student, cached).item() == pytest.approx(1 / 28, rel=1e-14)
    assert reference_at(student, teacher).item() == pytest.approx(1 / 28, rel=1e-14)
    pooled_map = pool2d(student.pow(2).mean(1, keepdim=True), (2, 2))
    assert torch.equal(pooled_map, torch.ones(1, 1, 2, 2, dtype=F64))  # the old order: 0


def test_at_value_and_gradient_equal_the_reference_when_the_student_is_larger():
    s, t = t64(rand(2, 3, 8, 8, seed=40), grad=True), t64(rand(2, 5, 4, 4, seed=41))
    ours = at_loss(s, attention(t).reshape(2, 4, 4))
    (g_ours,) = torch.autograd.grad(ours, s)
    ref = reference_at(s, t)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)


def test_at_odd_p_takes_the_absolute_value_unlike_the_references_code():
    """|A|^p here (the paper's map, and stage one's); the references' A^p agrees for even p
    and for non-negative (post-ReLU) activations, and on |A| always."""
    s, t = rand(2, 3, 4, 4, seed=42), rand(2, 5, 4, 4, seed=43)
    ours = at_loss(t64(s), attention(t64(t), 3.0), p=3.0).item()
    assert ours == pytest.approx(reference_at(t64(abs(s)), t64(abs(t)), 3.0).item(), rel=1e-12)
    assert ours != pytest.approx(reference_at(t64(s), t64(t), 3.0).item(), rel=1e-3)
    relu = at_loss(t64(abs(s)), attention(t64(abs(t)), 3.0), p=3.0).item()
    assert relu == pytest.approx(reference_at(t64(abs(s)), t64(abs(t)), 3.0).item(), rel=1e-12)


def test_fitnet_worked_example_is_half_the_references_mse():
    """r(S) = 2·S + 1 = [[1, 3], [5, 7]] against H = [[1, 2], [3, 4]]: squares 0, 1, 4, 9,
    mean 3.5; FitNets' ½ gives 1.75. RepDistiller's HintLoss is the plain MSELoss, 3.5."""
    s = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]], dtype=F64)
    h = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=F64)
    reg = make_regressor((1, 2, 2), (1, 2, 2)).double()
    with torch.no_grad():
        reg.weight.fill_(2.0)
        reg.bias.fill_(1.0)
    assert fitnet_loss(s, h, regressors=reg).item() == pytest.approx(1.75, rel=1e-15)
    assert torch.nn.MSELoss()(reg(s), h).item() == pytest.approx(3.5, rel=1e-15)


def reference_nst(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's NSTLoss.nst_loss (full_loss), re-written: poly kernel (xᵀy)²."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = pool2d(f_t, (s_h, s_h))
    f_s = torch.nn.functional.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = torch.nn.functional.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return poly(f_t, f_t).mean() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()


def test_nst_worked_example():
    """Student channels [3, 0], [0, 2] -> unit e1, e2; teacher channel [5, 0] -> e1. Kernel
    (xᵀy)²: mean over student pairs 2/4, teacher 1, cross (1 + 0)/2: 1/2 + 1 - 2·1/2 = 1/2."""
    s = torch.tensor([[[[3.0, 0.0]], [[0.0, 2.0]]]], dtype=F64)  # (1, 2, 1, 2)
    t = torch.tensor([[[[5.0, 0.0]]]], dtype=F64)  # (1, 1, 1, 2)
    assert nst_loss(s, t).item() == pytest.approx(0.5, rel=1e-15)
    assert reference_nst(s, t).item() == pytest.approx(0.5, rel=1e-15)
    # Pooled (student 4×4 to the hint's 2×2), two samples: the reference's value.
    s = (torch.arange(64, dtype=F64).reshape(2, 2, 4, 4) * 7 % 11 - 5) / 3
    t = (torch.arange(24, dtype=F64).reshape(2, 3, 2, 2) * 5 % 7 - 3) / 2
    assert nst_loss(s, t).item() == pytest.approx(reference_nst(s, t).item(), rel=1e-12)


def test_fsp_worked_example():
    """A = [[1, 2], [0, 1]], B = [[3, 1]] over 2 positions: G = A·Bᵀ/2 = [[5/2], [1/2]]; the
    teacher's [[2, 2], [1, 1]], [[1, 1]] give [[2], [1]]: mean of 1/4, 1/4 = 1/4. RepDistiller's
    compute_fsp builds the transpose, (B, C_b, C_a); the mean square is the same."""
    a_s = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]], dtype=F64)  # (1, 2, 1, 2)
    b_s = torch.tensor([[[[3.0, 1.0]]]], dtype=F64)  # (1, 1, 1, 2)
    a_t = torch.tensor([[[[2.0, 2.0]], [[1.0, 1.0]]]], dtype=F64)
    b_t = torch.tensor([[[[1.0, 1.0]]]], dtype=F64)
    g_t = fsp_matrix(a_t, b_t)
    torch.testing.assert_close(g_t, torch.tensor([[[2.0], [1.0]]], dtype=F64))
    assert fsp_loss((a_s, b_s), g_t).item() == pytest.approx(0.25, rel=1e-15)

    def compute_fsp(bot: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        bot, top = bot.unsqueeze(1), top.unsqueeze(2)
        bot = bot.reshape(bot.shape[0], bot.shape[1], bot.shape[2], -1)
        top = top.reshape(top.shape[0], top.shape[1], top.shape[2], -1)
        return (bot * top).mean(-1)

    ref = (compute_fsp(a_s, b_s) - compute_fsp(a_t, b_t)).pow(2).mean()
    assert ref.item() == pytest.approx(0.25, rel=1e-15)


def test_sobolev_worked_example():
    """z = W·x with W = [[1, 2], [3, -2]] at x = 0: p = [1/2, 1/2], r = e1, so
    ∂p_0/∂z = [1/4, -1/4] and g = Wᵀ·[1/4, -1/4] = [-1/2, 1]; against a cached [1/2, 1] the
    squared distance is 1."""
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -2.0]]))
    r = torch.tensor([[1.0, 0.0]], dtype=F64)
    x = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.softmax(model(x), 1)[:, 0].sum(), x)  # the reference
    torch.testing.assert_close(g, torch.tensor([[-0.5, 1.0]], dtype=F64))
    teacher = torch.tensor([[[0.5, 1.0]]], dtype=F64)  # (B, K, D)
    got = sobolev_loss(model(x), teacher, inputs=x, projections=r, temperature=1.0)
    assert got.item() == pytest.approx(1.0, rel=1e-15)
