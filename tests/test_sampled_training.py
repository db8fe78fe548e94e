"""Students from sampled targets (`--sample-k K [--sample-values]`): kd and soft train through
`pipeline.cache.sparse.sparse_kd_loss` on the target `sampled_distribution` gives at the student's
T, in memory and streamed, under a view plan too; the other losses, and T != 1 without the
drawn classes' logits, are refused in one line. `pipeline verify --teacher` recomputes top-k
and sampled rows."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import open_cache
from pipeline.cache.schema import SAMPLE_COUNTS, SAMPLE_IDS, SAMPLE_INDICES, TOPK_VALUES
from pipeline.cache.sparse import SPARSE_SUPPORT, sample_targets, sampled_distribution
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student import distill
from pipeline.student.losses import LOSSES, get_loss
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import open_targets, plan_views
from stages import precompute_logits, train_student
from stages import verify as verify_stage
from tests.cache.helpers import reseal
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

K = 4096  # draws per row on 10 classes: counts / K is within ~0.008 of p
SHARDS = {"chunk_rows": 64, "chunks_per_shard": 2}  # shards of 128 rows: streaming is real
VIEWS = {"views": 2, "augment": "crop:pad=2,flip", "seed": 7}
STUDENT = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 2, "seed": 1}


def _cache(tmp_path_factory, teacher, name, data, **kw):
    out = tmp_path_factory.mktemp("sampled") / name
    return precompute_logits.run(PrecomputeConfig(**kw), [str(teacher)], data, out)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, teacher_ckpt):
    """digits:train, K = 4096 draws per row with their logits, in shards of 128 rows."""
    kw = {"sample_k": K, "sample_values": True, **SHARDS}
    return _cache(tmp_path_factory, teacher_ckpt, "s.zarr", "digits:train", **kw)


@pytest.fixture(scope="module")
def counts_only(tmp_path_factory, teacher_ckpt):
    """digits:test, 16 draws per row, counts only (no sample/values)."""
    return _cache(tmp_path_factory, teacher_ckpt, "c.zarr", "digits:test", sample_k=16)


@pytest.fixture(scope="module")
def sampled_views(tmp_path_factory, teacher_ckpt):
    """digits:test, 2 augmented views, 64 draws per view with their logits."""
    kw = {"sample_k": 64, "sample_values": True, **VIEWS, **SHARDS}
    return _cache(tmp_path_factory, teacher_ckpt, "v.zarr", "digits:test", **kw)


def _hand_target(cache_path, ts, temperature: float) -> np.ndarray:
    """The sampled target of every row of `ts` at T, view 0, written out here: counts / K at
    T = 1, else c_i exp(v_i (1/T - 1)) normalised over the drawn classes.  # (N, C) float64"""
    with open_cache(cache_path) as cache:
        rows, c = cache.rows_for(ts.sample_ids), cache.num_classes
        nodes = {name: a[rows, 0] for name, a in cache.sampled().items()}  # each (N, W)
    counts = nodes["sample/counts"].astype(np.float64)
    weights = counts.copy()
    if temperature != 1.0:
        v = nodes["sample/values"].astype(np.float64)
        weights = counts * np.exp(v * (1 / temperature - 1))
    dense = np.zeros((len(ts), c))
    for i in range(len(ts)):
        for cls, w, n in zip(nodes["sample/indices"][i], weights[i], counts[i], strict=True):
            if n > 0:
                dense[i, cls] += w
    return dense / dense.sum(1, keepdims=True)


def _served(targets, temperature: float, epoch: int = 0) -> np.ndarray:
    """Every row's served target at T, by row.  # (N, C)"""
    out = np.full((targets.num_rows, targets.num_classes), np.nan)
    for rows, batch in targets.epoch(epoch, 100, seed=3):
        out[rows] = targets.teacher(batch, "mean-logits", temperature).double().numpy()
    return out


def _kd_by_hand(s, target, labels, temperature, alpha):
    """(1-a)·CE(labelled rows) + a·T²·mean_b sum_i p_i log(p_i / q_i), q = softmax(s/T), and
    its gradient a·T·(q - p)/B + (1-a)·(softmax(s) - onehot(y))/n, all in float64."""
    s, p = s.astype(np.float64), target.astype(np.float64)
    b, c = s.shape
    z = s / temperature
    log_q = z - z.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    kl = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0).sum(1).mean()
    known = labels >= 0
    log_q1 = s - s.max(1, keepdims=True)
    log_q1 -= np.log(np.exp(log_q1).sum(1, keepdims=True))
    ce = -log_q1[known, labels[known]].mean()
    grad = alpha * temperature * (np.exp(log_q) - p) / b
    onehot = np.eye(c)[labels[known]]
    grad[known] += (1 - alpha) * (np.exp(log_q1[known]) - onehot) / known.sum()
    return (1 - alpha) * ce + alpha * temperature**2 * kl, grad


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_at_t1_the_target_is_counts_over_k_and_kd_is_the_hand_formula(sampled, mode):
    ts = load_transfer_set("digits:train")
    targets, attrs = open_targets(sampled, ts, mode=mode, budget="300KiB")
    assert targets.mode == mode and targets.form == "distribution"
    served = _served(targets, 1.0)
    np.testing.assert_allclose(served, _hand_target(sampled, ts, 1.0), rtol=0, atol=1e-7)
    # One batch through the bound kd loss, as the trainer calls it, against the hand formula.
    rows = np.arange(64)
    labels = np.where(rows % 3 == 0, -1, ts.labels[rows])  # a third unlabelled
    s = torch.randn(64, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s.requires_grad_(True)
    loss_fn = get_loss("kd").bind(1.0, {"alpha": 0.7}, "distribution")
    target = torch.from_numpy(served[rows])
    loss = loss_fn(s, target, torch.from_numpy(labels))
    loss.backward()
    want, want_grad = _kd_by_hand(s.detach().numpy(), served[rows], labels, 1.0, 0.7)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), want_grad, rtol=1e-6, atol=1e-9)


def test_the_sampled_gradient_is_unbiased_at_t1(train_cache):
    """The mean over 256 independently seeded draws of K = 16 classes per row approaches
    the kd gradient from the full logits (each entry within 5 sigma of the mean of counts
    / K; the error shrinks as 1/sqrt(draws)), while one draw is far off."""
    with open_cache(train_cache) as cache:
        x = cache.logits(slice(0, 32))[:, 0]  # (B, C) the real teacher's logits
    labels, k, draws = torch.full((32,), -1), 16, 256
    s = torch.randn(32, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    LOSSES["kd"].fn(s, torch.from_numpy(x), labels, temperature=1.0, alpha=1.0).backward()
    full, s.grad = s.grad.clone(), None
    on_samples = get_loss("kd").bind(1.0, {"alpha": 1.0}, "distribution")

    def gradient(copies: int) -> torch.Tensor:
        """The mean gradient over `copies` draws per row: row i of copy r is drawn with the
        generator of (seed 0, id 32 r + i), so every draw is independent of the others."""
        indices, counts = sample_targets(np.tile(x, (copies, 1)), k, 0, np.arange(32 * copies))
        target = sampled_distribution(indices, counts, 10, 1.0)  # (copies · B, C)
        on_samples(s.repeat(copies, 1), target, labels.repeat(copies)).backward()
        grad, s.grad = s.grad.clone(), None
        return grad  # the batch mean over copies · B rows: the mean of the per-draw gradients

    one, mean = gradient(1), gradient(draws)
    p = torch.softmax(torch.from_numpy(x).double(), 1)
    sigma = (p * (1 - p) / (k * draws)).sqrt() / 32  # of T (q - mean p_hat) / B, per entry
    assert ((mean - full).abs().double() <= 5 * sigma + 1e-7).all()
    one_off = float((one - full).norm() / full.norm())
    mean_off = float((mean - full).norm() / full.norm())
    assert one_off > 0.4 and mean_off < 0.07  # measured: 0.69 and 0.042 (0.69 / sqrt(256))
    assert mean_off < 2 * one_off / draws**0.5


def test_a_student_from_k_4096_draws_ends_near_the_full_caches(tmp_path, sampled, train_cache):
    cfg = TrainStudentConfig(**STUDENT, temperature=1.0)
    a = train_student.run(cfg, train_cache, "digits:train", tmp_path / "full")
    b = train_student.run(cfg, sampled, "digits:train", tmp_path / "sampled")
    (ma, _), (mb, _) = load_checkpoint(a / "student.pt"), load_checkpoint(b / "student.pt")
    sa, sb = ma.state_dict(), mb.state_dict()
    for key in sa:  # measured: at most 0.9% (K = 64: 5%), the noise of counts / K
        assert float((sa[key] - sb[key]).norm() / sa[key].norm()) < 0.02, key
    x = torch.from_numpy(load_transfer_set("digits:test").inputs)
    with torch.no_grad():
        agree = (ma.eval()(x).argmax(1) == mb.eval()(x).argmax(1)).float().mean()
    assert agree >= 0.95
    info = json.loads((b / "student.json").read_text())
    assert info["cache"]["targets"] == {
        "kind": "sampled",
        "k": K,
        "values": True,
        "proposal_temperature": 1.0,
        "seed": 0,
    }
    assert json.loads((a / "student.json").read_text())["cache"]["targets"] == {"kind": "logits"}


def test_at_another_t_values_give_the_self_normalised_estimate(sampled, train_cache):
    ts = load_transfer_set("digits:train")
    targets, _ = open_targets(sampled, ts)
    for t in (0.5, 4.0):
        served = _served(targets, t)
        np.testing.assert_allclose(served, _hand_target(sampled, ts, t), rtol=1e-6, atol=1e-9)
        with open_cache(train_cache) as cache:  # consistent: K = 4096 is near the truth
            z = cache.logits(cache.rows_for(ts.sample_ids))[:, 0].astype(np.float64) / t
        p = np.exp(z - z.max(1, keepdims=True))
        error = np.abs(served - p / p.sum(1, keepdims=True))  # measured: max 0.032, mean 0.0035
        assert error.max() < 0.05 and error.mean() < 0.006
    s = torch.randn(50, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s.requires_grad_(True)
    labels = ts.labels[:50]
    loss = get_loss("kd").bind(4.0, {"alpha": 0.5}, "distribution")
    value = loss(s, torch.from_numpy(served[:50]), torch.from_numpy(labels))
    value.backward()
    want, want_grad = _kd_by_hand(s.detach().numpy(), served[:50], labels, 4.0, 0.5)
    assert float(value.detach()) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), want_grad, rtol=1e-6, atol=1e-9)


def test_another_t_without_values_is_refused_in_one_line(tmp_path, runner, counts_only):
    base = ["train-student", "--cache", counts_only, "--data", "digits:test"]
    result = invoke(runner, *base, "--out", tmp_path / "s", "--temperature", "4")
    assert_clean_error(
        result,
        "loss kd at T = 4 (--temperature)",
        "train at --temperature 1, or re-run precompute-logits with --sample-values",
    )
    assert not (tmp_path / "s").exists()
    ok = invoke(runner, *base, "--out", tmp_path / "t1", "--temperature", "1", "--epochs", "1")
    assert ok.exit_code == 0, ok.output
    info = json.loads((tmp_path / "t1" / "student.json").read_text())
    assert info["cache"]["targets"]["values"] is False and info["cache"]["targets"]["k"] == 16


@pytest.mark.parametrize("loss", ["dkd", "dist", "mse"])
def test_losses_not_linear_in_the_target_are_refused_with_their_reason(
    tmp_path, runner, counts_only, loss
):
    args = ["--cache", counts_only, "--data", "digits:test", "--out", tmp_path / "s"]
    result = invoke(runner, "train-student", *args, "--loss", loss, "--temperature", "1")
    reason = SPARSE_SUPPORT[loss]["sampled"]
    assert_clean_error(result, f"loss {loss} cannot train from sampled targets: {reason}")
    assert not (tmp_path / "s").exists()


def test_soft_and_ce_train_from_samples(tmp_path, counts_only):
    for loss in ("soft", "ce"):
        cfg = TrainStudentConfig(**{**STUDENT, "epochs": 1}, loss=loss, temperature=1.0)
        out = train_student.run(cfg, counts_only, "digits:test", tmp_path / loss)
        info = json.loads((out / "student.json").read_text())
        assert info["cache"]["targets"]["kind"] == "sampled"
        assert info["cache"]["read"] == (None if loss == "ce" else "memory")


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_view_plan_serves_each_views_sampled_row(sampled_views, mode):
    ts = load_transfer_set("digits:test")
    plan = plan_views(2, ts.sample_ids, seed=5)
    targets, _ = open_targets(sampled_views, ts, mode=mode, budget="200KiB")
    targets = targets.with_plan(plan)
    assert targets.mode == mode
    with open_cache(sampled_views) as cache:
        rows = cache.rows_for(ts.sample_ids)
        nodes = {n: a[rows] for n, a in cache.sampled().items()}  # (N, V, W)
    r = np.arange(len(ts))
    for epoch in (0, 1):
        v = plan.of(r, epoch)
        want = sampled_distribution(
            nodes["sample/indices"][r, v],
            nodes["sample/counts"][r, v],
            10,
            2.0,
            values=nodes["sample/values"][r, v],
        ).numpy()
        np.testing.assert_allclose(_served(targets, 2.0, epoch), want, rtol=1e-6, atol=1e-8)


def test_streamed_and_in_memory_students_end_with_the_same_weights(
    tmp_path, sampled_views, monkeypatch
):
    """One batch per epoch (the batch order is the one thing the modes may differ in)."""
    cfg = TrainStudentConfig(**STUDENT, batch_size=512, temperature=2.0, holdout=0.0)
    memory = train_student.run(cfg, sampled_views, "digits:test", tmp_path / "memory")
    streamed = functools.partial(open_targets, mode="stream")
    monkeypatch.setattr(distill, "open_targets", streamed)
    stream = train_student.run(cfg, sampled_views, "digits:test", tmp_path / "stream")
    reads = [
        json.loads((p / "student.json").read_text())["cache"]["read"] for p in (memory, stream)
    ]
    assert reads == ["memory", "stream"]
    (ma, _), (mb, _) = (
        load_checkpoint(memory / "student.pt"),
        load_checkpoint(stream / "student.pt"),
    )
    for key, value in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def topk(tmp_path_factory, teacher_ckpt):
    return _cache(tmp_path_factory, teacher_ckpt, "t.zarr", "digits:test", topk=3)


def test_verify_recomputes_topk_and_sampled_rows(
    tmp_path_factory, runner, teacher_ckpt, topk, sampled_views
):
    """Every row, on every view (regenerated from the views' seeds), full logits too."""
    views = _cache(tmp_path_factory, teacher_ckpt, "f.zarr", "digits:test", **VIEWS)
    for path in (topk, sampled_views, views):
        summary = verify_stage.run(path, "digits:test", [str(teacher_ckpt)], sample=360)
        assert summary["teacher_rows_checked"] == 360
    args = ["verify", sampled_views, "--data", "digits:test", "--teacher", teacher_ckpt]
    result = invoke(runner, *args, "--sample", "16")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("node", [TOPK_VALUES, SAMPLE_COUNTS, SAMPLE_INDICES])
def test_verify_names_a_tampered_row(tmp_path, teacher_ckpt, node):
    """One stored number changed, the node still well-formed (values descending, counts
    summing to K, classes increasing), so only the shard digest and the teacher know."""
    kw = {"topk": 3} if node == TOPK_VALUES else {"sample_k": 64, "sample_values": True}
    out = precompute_logits.run(
        PrecomputeConfig(**kw), [str(teacher_ckpt)], "digits:test", tmp_path / "c.zarr"
    )
    group = zarr.open_group(str(out), mode="r+")
    words = group[node][:]  # (N, 1, K or W)
    if node == TOPK_VALUES:
        row = 123
        words[row, 0, 1] -= np.float32(0.01)
    elif node == SAMPLE_COUNTS:  # one draw moved between two drawn classes
        row = 123
        drawn = np.flatnonzero(words[row, 0])
        words[row, 0, drawn[0]] += 1
        words[row, 0, drawn[-1]] -= 1
    else:  # the last drawn class of a row that never drew class 9 becomes 9
        counts = group[SAMPLE_COUNTS][:, 0]
        last = (counts > 0).sum(1) - 1  # (N,) slot of each row's last drawn class
        row = int(np.flatnonzero(words[np.arange(len(words)), 0, last] < 9)[0])
        words[row, 0, last[row]] = 9
    group[node][row : row + 1] = words[row : row + 1]
    sid = int(group[SAMPLE_IDS][row])
    with pytest.raises(PipelineError, match="not what was written at this place"):
        verify_stage.run(out, "digits:test", [str(teacher_ckpt)], sample=360)  # its seal
    reseal(out)  # sealed as it now is: only the teacher knows
    with pytest.raises(PipelineError) as e:
        verify_stage.run(out, "digits:test", [str(teacher_ckpt)], sample=360)
    message = str(e.value)
    assert "\n" not in message
    assert f"teacher spot check: {node} of 1 of 360 sampled rows differ" in message
    assert f"sample ids [{sid}]" in message


def test_the_command_line_options_write_the_cache_params_write(tmp_path, runner, teacher_ckpt):
    """--sample-k/--sample-values on the command line give the cache the params file gives."""
    out = tmp_path / "cli.zarr"
    result = invoke(
        runner, "precompute-logits", "--teacher", str(teacher_ckpt), "--data", "digits:test",
        "--out", str(out), "--sample-k", "16", "--sample-values",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cfg = PrecomputeConfig(sample_k=16, sample_values=True)
    params = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", tmp_path / "p.zarr")
    with open_cache(out) as a, open_cache(params) as b:
        for node in ("sample/indices", "sample/counts", "sample/values"):
            np.testing.assert_array_equal(a.read(node), b.read(node))
