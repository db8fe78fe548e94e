"""Sparse targets (pipeline/cache/sparse.py) against the dense softmax, computed here in float64."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import sparse
from pipeline.cache.sparse import (
    KINDS,
    check_sparse_loss,
    draws_match,
    index_dtype,
    planes_distribution,
    sample_targets,
    sampled_distribution,
    sampled_planes,
    sparse_kd_loss,
    sparse_support,
    take_values,
    topk_distribution,
    topk_logits,
    topk_targets,
)
from pipeline.core.errors import PipelineError
from pipeline.student.losses import LOSSES, labelled_ce

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0)


def softmax64(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = x.astype(np.float64) / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def teacher(n: int = 64, c: int = 50, seed: int = 0, offset: float = 5.0) -> np.ndarray:
    """Peaked raw logits (N, C) float32, shifted away from 0 like real raw logits."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c)) * 3 + offset).astype(np.float32)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_topk_is_exact_at_t1(k):
    x = teacher()
    values, indices, lse = topk_targets(x, k)
    assert values.dtype == np.float32 and lse.dtype == np.float32 and indices.dtype == np.int16
    p = softmax64(x)  # (N, C)
    true_top = np.sort(x, 1)[:, ::-1][:, :k]
    np.testing.assert_array_equal(values, true_top)  # the k largest, largest first
    np.testing.assert_array_equal(np.take_along_axis(x, indices.astype(int), 1), values)
    target = topk_distribution(values, indices, lse, x.shape[1], 1.0).double().numpy()
    kept = np.take_along_axis(target, indices.astype(int), 1)
    np.testing.assert_allclose(kept, np.take_along_axis(p, indices.astype(int), 1), rtol=2e-6)
    tail_true = 1 - np.take_along_axis(p, indices.astype(int), 1).sum(1)
    np.testing.assert_allclose(1 - kept.sum(1), tail_true, atol=2e-6)
    np.testing.assert_allclose(target.sum(1), 1.0, atol=1e-6)


def test_topk_tail_is_uniform_and_bounds_the_true_tail():
    """Tail classes share one probability; for T > 1 their total bounds the true one from
    above (power-mean inequality), for T < 1 from below."""
    x, k = teacher(), 5
    values, indices, lse = topk_targets(x, k)
    tail = np.ones_like(x, dtype=bool)
    np.put_along_axis(tail, indices.astype(int), False, 1)
    for t in TEMPERATURES:
        target = topk_distribution(values, indices, lse, x.shape[1], t).double().numpy()
        tails = target[tail].reshape(len(x), -1)  # (N, C - k)
        np.testing.assert_allclose(tails, tails[:, :1].repeat(tails.shape[1], 1), rtol=1e-6)
        estimate, true = tails.sum(1), softmax64(x, t)[tail].reshape(len(x), -1).sum(1)
        if t > 1:
            assert (estimate >= true * (1 - 1e-5)).all()
        elif t < 1:
            assert (estimate <= true * (1 + 1e-5)).all()
        assert (target.argmax(1) == x.argmax(1)).all()


@pytest.mark.parametrize("t", TEMPERATURES)
def test_topk_with_k_equal_c_is_the_dense_distribution(t):
    x = teacher()
    values, indices, lse = topk_targets(x, x.shape[1])
    torch.testing.assert_close(topk_logits(values, indices, lse, x.shape[1]), torch.tensor(x))
    target = topk_distribution(values, indices, lse, x.shape[1], t).double().numpy()
    np.testing.assert_allclose(target, softmax64(x, t), atol=1e-6)


def test_index_dtype_is_int16_up_to_32767_classes():
    assert index_dtype(10) == np.int16 and index_dtype(32767) == np.int16
    assert index_dtype(32768) == np.int32
    x = teacher(n=3, c=40000)
    x[:, 39999] += 100  # the top class needs more than int16
    values, indices, lse = topk_targets(x, 4)
    assert indices.dtype == np.int32 and (indices[:, 0] == 39999).all()
    indices, counts = sample_targets(x, 4, 0, np.arange(3))
    assert indices.dtype == np.int32


@pytest.mark.parametrize("k", [0, -1, 51, 2.5, True])
def test_bad_k_is_refused_in_one_line(k):
    with pytest.raises(PipelineError, match=r"--topk must be an integer in \[1, 50\]") as err:
        topk_targets(teacher(), k)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k", [0, -3, 70000])
def test_bad_sample_k_is_refused_in_one_line(k):
    with pytest.raises(PipelineError, match="--sample-k must be") as err:
        sample_targets(teacher(), k, 0, np.arange(64))
    assert "\n" not in str(err.value)


def test_topk_refuses_bad_shapes():
    values, indices, lse = topk_targets(teacher(), 5)
    with pytest.raises(PipelineError, match="outside"):
        topk_logits(values, indices, lse, 10)  # class indices up to 49 with C = 10
    with pytest.raises(PipelineError, match="same"):
        topk_distribution(values[:, :3], indices, lse, 50, 1.0)
    with pytest.raises(PipelineError, match="temperature must be > 0"):
        topk_distribution(values, indices, lse, 50, 0.0)


def test_no_tail_left_by_rounding_stays_finite():
    """float16 values can round the kept mass above 1: the tail logit stays finite, so
    kl_div-based losses give no NaN."""
    x = teacher(c=20)
    values, indices, lse = topk_targets(x, 19)
    values = values + 1e-3  # the kept mass now exceeds 1
    z = topk_logits(values, indices, lse, 20)
    assert torch.isfinite(z).all()
    s = torch.randn(len(x), 20, requires_grad=True)
    labels = torch.full((len(x),), -1)
    loss = LOSSES["dkd"].fn(s, z, labels, temperature=4.0, alpha=1, beta=8, warmup=0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_sampled_counts_sum_to_k_and_are_reproducible():
    x, k = teacher(n=32), 20
    ids = np.arange(100, 132)
    indices, counts = sample_targets(x, k, seed=7, ids=ids)
    assert indices.shape == counts.shape == (32, 20) and counts.dtype == np.uint8
    assert (counts.sum(1) == k).all()
    for row_idx, row_counts in zip(indices, counts, strict=True):  # distinct, then padding
        used = row_counts > 0
        assert (np.diff(row_idx[used]) > 0).all() and (row_idx[~used] == 0).all()
    again = sample_targets(x, k, seed=7, ids=ids)
    np.testing.assert_array_equal(again[0], indices)
    np.testing.assert_array_equal(again[1], counts)
    other = sample_targets(x, k, seed=8, ids=ids)
    assert not np.array_equal(other[0], indices)


def test_sampled_rows_do_not_depend_on_the_batch():
    x, k, ids = teacher(n=40), 30, np.arange(40) * 3 - 7  # negative ids too
    indices, counts = sample_targets(x, k, 1, ids)
    pick = np.random.default_rng(0).permutation(40)[:13]
    part = sample_targets(x[pick], k, 1, ids[pick])
    np.testing.assert_array_equal(part[0], indices[pick])
    np.testing.assert_array_equal(part[1], counts[pick])


def test_sampled_distribution_is_unbiased_at_the_proposal_temperature():
    """The mean of counts / K over 4000 independent rows approaches p (5-sigma tolerance),
    and so does the mean KD gradient (it is linear in the target)."""
    c, k, rows = 6, 10, 4000
    x = np.repeat(teacher(n=1, c=c, offset=0.0) / 2, rows, 0)  # one teacher row, many ids
    indices, counts = sample_targets(x, k, 3, np.arange(rows))
    target = sampled_distribution(indices, counts, c, 1.0).double().numpy()  # (rows, C)
    p = softmax64(x[:1])[0]
    sigma = np.sqrt(p * (1 - p) / (k * rows))
    assert (np.abs(target.mean(0) - p) < 5 * sigma + 1e-9).all()
    s = torch.randn(1, c).repeat(rows, 1).requires_grad_(True)
    sparse_kd_loss(s, torch.from_numpy(target).float(), temperature=1.0).backward()
    full = torch.softmax(s[:1].detach(), 1) - torch.from_numpy(p[None]).float()  # T (q - p)
    assert torch.allclose(s.grad.sum(0), full[0], atol=float(5 * sigma.max()))


def test_sampled_other_temperature_needs_values_and_is_consistent():
    c, k = 8, 20000
    x = teacher(n=2, c=c, offset=0.0) / 2
    indices, counts = sample_targets(x, k, 0, np.arange(2))
    with pytest.raises(PipelineError, match="counts alone"):
        sampled_distribution(indices, counts, c, 2.0)
    values = take_values(x, indices)
    same = sampled_distribution(indices, counts, c, 1.0, values=values)
    torch.testing.assert_close(same, sampled_distribution(indices, counts, c, 1.0))
    for t in (0.5, 2.0, 4.0):  # self-normalised importance sampling: consistent in K
        target = sampled_distribution(indices, counts, c, t, values=values).double().numpy()
        np.testing.assert_allclose(target, softmax64(x, t), atol=0.02)


def test_sampled_with_k_above_c_keeps_width_c():
    indices, counts = sample_targets(teacher(n=4, c=5), 300, 0, np.arange(4))
    assert indices.shape == (4, 5) and counts.dtype == np.uint16
    assert (counts.sum(1) == 300).all()


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kd_from_topk_with_k_equal_c_equals_dense_kd(t):
    x = teacher(n=16, c=12)
    labels = torch.tensor([3, -1] * 8)
    values, indices, lse = topk_targets(x, 12)
    s1 = torch.randn(16, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    dense = LOSSES["kd"].fn(s1, torch.tensor(x), labels, temperature=t, alpha=0.9)
    target = topk_distribution(values, indices, lse, 12, t)
    sparse = 0.9 * sparse_kd_loss(s2, target, temperature=t) + 0.1 * labelled_ce(s2, labels)
    dense.backward()
    sparse.backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["kd", "soft", "dkd", "dist"])
def test_registered_losses_take_topk_logits_at_k_equal_c(name):
    x = teacher(n=16, c=12)
    values, indices, lse = topk_targets(x, 12)
    s, labels = torch.randn(16, 12), torch.full((16,), -1)
    spec = LOSSES[name]
    settings = {key: setting.default for key, setting in spec.settings.items()}
    if spec.reads_epoch:  # dkd: its warm-up's first epoch
        settings["epoch"] = 0
    dense = spec.fn(s, torch.tensor(x), labels, temperature=2.0, **settings)
    sparse = spec.fn(s, topk_logits(values, indices, lse, 12), labels, temperature=2.0, **settings)
    torch.testing.assert_close(sparse, dense)


def test_stage_one_can_import_sparse_without_the_losses():
    """precompute will call topk_targets / sample_targets: the teacher's stages must never
    run the student code (tests/test_architecture.py), so this module must not import it."""
    tree = ast.parse(Path(sparse.__file__).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in modules if m and m.startswith("pipeline")} == {"pipeline.core.errors"}


def test_every_registered_loss_is_assessed_for_each_kind():
    for name in LOSSES:
        for kind in KINDS:
            reason = sparse_support(name, kind)
            assert reason is None or "not assessed" not in reason, (name, kind)
    assert sparse_support("kd", "sampled") is None and sparse_support("dkd", "topk") is None
    for name, kind in [("mse", "topk"), ("mse", "sampled"), ("dkd", "sampled")]:
        with pytest.raises(PipelineError, match=f"loss {name} cannot train from {kind}") as err:
            check_sparse_loss(name, kind)
        assert "\n" not in str(err.value)
    assert "not assessed" in sparse_support("mypkg.losses:fancy", "topk")
    with pytest.raises(PipelineError, match="unknown sparse target kind"):
        sparse_support("kd", "dense")


@pytest.mark.parametrize("with_values", [False, True])
def test_planes_give_the_distribution_of_the_stored_rows(with_values):
    """What stage two holds (counts and logits spread over C) rebuilds exactly the target
    `sampled_distribution` gives from the stored rows, at every T the row allows."""
    x, c = teacher(n=24, c=30), 30
    indices, counts = sample_targets(x, 40, 5, np.arange(24))  # padding in most rows
    values = take_values(x, indices) if with_values else None
    planes = sampled_planes(indices, counts, values, c)
    assert planes.shape == (24, 2 if with_values else 1, c) and planes.dtype == np.float32
    np.testing.assert_array_equal(planes[:, 0].sum(1), 40)
    for t in TEMPERATURES if with_values else (1.0,):
        want = sampled_distribution(indices, counts, c, t, values=values)
        got = planes_distribution(torch.from_numpy(planes), t)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    if not with_values:
        with pytest.raises(PipelineError, match="counts alone"):
            planes_distribution(torch.from_numpy(planes), 2.0)


def test_a_stored_draw_matches_and_only_boundary_draws_may_move():
    x, k, ids = teacher(n=64, c=20, offset=0.0) / 2, 200, np.arange(64) + 1000
    indices, counts = sample_targets(x, k, 3, ids)
    assert draws_match(x, k, 3, ids, indices, counts).all()
    assert not draws_match(x, k, 4, ids, indices, counts).any()  # another seed
    # Logits recomputed 1e-3 off move some draws across a class boundary: a mismatch
    # without slack, none with the slack those logits allow.
    moved = x + np.random.default_rng(0).uniform(-1e-3, 1e-3, x.shape).astype(np.float32)
    again = sample_targets(moved, k, 3, ids)
    changed = ~((again[0] == indices).all(1) & (again[1] == counts).all(1))
    assert 0 < changed.sum() < 64
    np.testing.assert_array_equal(~draws_match(moved, k, 3, ids, indices, counts), changed)
    assert draws_match(moved, k, 3, ids, indices, counts, slack=np.expm1(2e-3)).all()
    # A draw moved between two classes far apart is no rounding.
    tampered = counts.copy()
    first, last = 0, int((counts[0] > 0).sum()) - 1
    tampered[0, first] -= 1
    tampered[0, last] += 1
    ok = draws_match(x, k, 3, ids, indices, tampered, slack=np.expm1(2e-3))
    assert not ok[0] and ok[1:].all()


def test_every_loss_that_trains_from_samples_takes_a_distribution():
    """kd and soft given softmax(t/T) are kd and soft given t; ce ignores the teacher; the
    losses sampled targets cannot train refuse to bind for a distribution."""
    x = torch.tensor(teacher(n=16, c=12))
    s, labels = torch.randn(16, 12), torch.tensor([3, -1] * 8)
    for name, spec in LOSSES.items():
        settings = {key: setting.default for key, setting in spec.settings.items()}
        if sparse_support(name, "sampled") is not None:
            with pytest.raises(PipelineError, match=f"loss {name} reads the teacher's logits"):
                spec.bind(2.0, settings, "distribution")
            continue
        for t in (1.0, 4.0):
            on_logits = spec.bind(t, settings)(s, x, labels)
            target = torch.softmax(x / t, 1) if spec.uses_teacher else None
            on_target = spec.bind(t, settings, "distribution")(s, target, labels)
            torch.testing.assert_close(on_target, on_logits, rtol=1e-5, atol=1e-6)
