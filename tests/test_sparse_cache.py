"""Sparse targets in the cache: `--topk K` stores the K largest raw logits, their classes and
the exact log-sum-exp instead of the full logits; stage two serves the dense logits rebuilt
from them (`pipeline.cache.sparse.topk_logits`), in memory and streamed, under a view plan too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.cache.reader import describe
from pipeline.cache.schema import (
    LOGITS,
    TOPK_INDICES,
    TOPK_LSE,
    TOPK_VALUES,
    Block,
    check_class_indices,
    check_topk_values,
)
from pipeline.cache.sparse import topk_logits
from pipeline.cache.verify import check_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.student.checks import check_targets_for_loss
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import open_targets, plan_views
from pipeline.teacher import shards as shards_lib
from stages import convert_cache, precompute_logits, train_student
from tests.cache.helpers import stable_attrs, zarr_files
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

LAYOUT = {"chunk_rows": 16, "chunks_per_shard": 2}  # digits:test (360 rows): 12 shards
SPARSE = (TOPK_VALUES, TOPK_INDICES, TOPK_LSE)


def _cache(tmp_path, teacher, data="digits:test", name="c.zarr", **kw):
    cfg = PrecomputeConfig(**kw)
    return precompute_logits.run(cfg, [str(teacher)], data, tmp_path / name)


def _by_hand(logits: np.ndarray, k: int):
    """Top-k of (N, C) logits without the code under test: a stable sort on -logit (ties:
    lower class first), and the log-sum-exp in float64.  # (N, k), (N, k), (N,)"""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    return np.take_along_axis(logits, order, 1), order, lse


def _served(cache_path, ts, mode, plan=None, epoch=0):
    """Every row's served teacher logits at `epoch`, by row of `ts`.  # (N, C)"""
    targets, _ = open_targets(cache_path, ts, mode=mode, budget="64MiB" if mode else "2GiB")
    if plan is not None:
        targets = targets.with_plan(plan)
    out = np.full((len(ts), targets.num_classes), np.nan, np.float32)
    for rows, batch in targets.epoch(epoch, 50, seed=3):
        out[rows] = batch.logits.numpy()
    return out


def test_stored_topk_is_the_teachers_topk_of_a_full_cache(tmp_path, teacher_ckpt):
    full = _cache(tmp_path, teacher_ckpt, name="full.zarr", **LAYOUT)
    sparse = _cache(tmp_path, teacher_ckpt, name="top3.zarr", topk=3, **LAYOUT)
    with open_cache(full) as a, open_cache(sparse) as b:
        logits = a.logits()[:, 0]  # (N, C)
        values, indices, lse = b.topk()
        want_v, want_i, want_lse = _by_hand(logits, 3)
        np.testing.assert_array_equal(values[:, 0], want_v)
        np.testing.assert_array_equal(indices[:, 0], want_i)
        assert indices.dtype == np.int16 and values.dtype == np.float32
        np.testing.assert_allclose(lse[:, 0], want_lse, rtol=1e-6)
        assert b.attrs["targets"] == "topk" and b.attrs["topk"]["k"] == 3
        assert b.attrs["params"]["topk"] == 3 and "topk" not in a.attrs["params"]
        assert not b.backend.has(LOGITS) and [n.name for n in b.nodes()][2:] == list(SPARSE)
        np.testing.assert_array_equal(b.sample_ids, a.sample_ids)
        with pytest.raises(PipelineError, match="holds topk targets, not logits"):
            b.logits()
        full_bytes = sum(x["bytes_per_sample"] for x in describe(a)["arrays"].values())
        sparse_bytes = sum(x["bytes_per_sample"] for x in describe(b)["arrays"].values())
    assert sparse_bytes < full_bytes  # 8 + 8 + 12 + 6 + 4 = 38 < 8 + 8 + 40 = 56
    assert check_cache(sparse)[0] == []


def test_float16_keeps_topk_values_float32(tmp_path, teacher_ckpt):
    path = _cache(tmp_path, teacher_ckpt, topk=4, dtype="float16", **LAYOUT)
    with open_cache(path) as cache:
        assert cache.backend.dtype(TOPK_VALUES) == np.float32
        assert cache.backend.dtype(TOPK_LSE) == np.float32


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_served_logits_are_topk_logits_of_the_stored_rows(tmp_path, teacher_ckpt, mode):
    path = _cache(tmp_path, teacher_ckpt, topk=3, **LAYOUT)
    ts = load_transfer_set("digits:test")
    with open_cache(path) as cache:
        rows = cache.rows_for(ts.sample_ids)
        values, indices, lse = (a[rows, 0] for a in cache.topk())
    want = topk_logits(values, indices, lse, 10).numpy()  # (N, C)
    np.testing.assert_array_equal(_served(path, ts, mode), want)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_view_plan_serves_each_views_topk_row(tmp_path, teacher_ckpt, mode):
    views = {"views": 3, "augment": "crop:pad=2,flip", "seed": 7}
    path = _cache(tmp_path, teacher_ckpt, topk=4, **views, **LAYOUT)
    ts = load_transfer_set("digits:test")
    plan = plan_views(3, ts.sample_ids, seed=5)
    with open_cache(path) as cache:
        rows = cache.rows_for(ts.sample_ids)
        values, indices, lse = (a[rows] for a in cache.topk())  # (N, V, K), ..., (N, V)
    for epoch in (0, 1):
        v = plan.of(np.arange(len(ts)), epoch)  # (N,)
        r = np.arange(len(ts))
        want = topk_logits(values[r, v], indices[r, v], lse[r, v], 10).numpy()
        np.testing.assert_array_equal(_served(path, ts, mode, plan, epoch), want)


def test_a_student_from_topk_with_k_equal_c_is_the_full_caches(tmp_path, teacher_ckpt, train_cache):
    sparse = _cache(tmp_path, teacher_ckpt, "digits:train", "top10.zarr", topk=10)
    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2, seed=1)
    a = train_student.run(cfg, train_cache, "digits:train", tmp_path / "full")
    b = train_student.run(cfg, sparse, "digits:train", tmp_path / "sparse")
    wa = torch.load(a / "student.pt", weights_only=False)
    wb = torch.load(b / "student.pt", weights_only=False)
    sa, sb = _state(wa), _state(wb)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)


def _state(checkpoint) -> dict[str, torch.Tensor]:
    """The model weights in a student checkpoint (whatever key holds them)."""
    for value in checkpoint.values() if isinstance(checkpoint, dict) else ():
        if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            return value
    raise AssertionError(f"no state dict in {list(checkpoint)}")


def test_losses_that_cannot_train_from_topk_are_refused_with_the_reason():
    attrs = {"targets": "topk", "topk": {"k": 5}}
    for loss in ("kd", "soft", "ce", "dkd", "dist"):
        check_targets_for_loss(attrs, loss)
    with pytest.raises(PipelineError, match="loss mse cannot train from topk targets: it regr"):
        check_targets_for_loss(attrs, "mse")
    with pytest.raises(PipelineError, match="loss my.mod:fn cannot train from topk targets"):
        check_targets_for_loss(attrs, "my.mod:fn")
    check_targets_for_loss({}, "mse")  # full logits: every loss


def test_resume_refuses_another_k_and_ends_byte_identical(tmp_path, teacher_ckpt, monkeypatch):
    forward, calls = shards_lib._forward, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C while shard 4 is computed
        return forward(*a, **kw)

    monkeypatch.setattr(shards_lib, "_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, teacher_ckpt, topk=3, **LAYOUT)
    monkeypatch.setattr(shards_lib, "_forward", forward)
    with pytest.raises(PipelineError, match="unfinished run with other settings") as e:
        _cache(tmp_path, teacher_ckpt, topk=4, **LAYOUT)
    assert "topk" in str(e.value)
    out = _cache(tmp_path, teacher_ckpt, topk=3, **LAYOUT)
    clean = _cache(tmp_path, teacher_ckpt, name="clean.zarr", topk=3, **LAYOUT)
    assert zarr_files(out) == zarr_files(clean)
    with open_cache(out) as a, open_cache(clean) as b:
        assert stable_attrs(a.attrs) == stable_attrs(b.attrs)


def test_convert_cache_keeps_the_topk_nodes(tmp_path, teacher_ckpt):
    src = _cache(tmp_path, teacher_ckpt, topk=3, **LAYOUT)
    h5, back = tmp_path / "c.h5", tmp_path / "back.zarr"
    convert_cache.run(src, h5)
    convert_cache.run(h5, back)
    with open_cache(src) as a, open_cache(h5) as b:
        assert [n.name for n in b.nodes()] == [n.name for n in a.nodes()]
        for x, y in zip(a.topk(), b.topk(), strict=True):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype
    assert zarr_files(back, root=False) == zarr_files(src, root=False)
    assert check_cache(h5)[0] == [] and check_cache(back)[0] == []


def test_node_checks_name_the_bad_rows():
    block = Block(np.array([10, 11]), 0, {"N": 2, "V": 1, "C": 10, "K": 3}, "float32")
    good = np.array([[[3.0, 2.0, 2.0]], [[1.0, 0.0, -1.0]]], np.float32)  # (S, V, K)
    assert check_topk_values(good, block) == []
    rising = good.copy()
    rising[1, 0] = [0.0, 1.0, -1.0]
    assert check_topk_values(rising, block) == [
        "values not in descending order for sample ids [11]"
    ]
    nan = good.copy()
    nan[0, 0, 2] = np.nan
    assert check_topk_values(nan, block) == ["NaN/Inf for sample ids [10]"]
    idx = np.array([[[0, 9, 3]], [[10, 1, 2]]], np.int16)
    assert check_class_indices(idx, block) == ["class indices outside [0, 10) for sample ids [11]"]


def test_topk_zero_is_the_full_cache(tmp_path, teacher_ckpt):
    a = _cache(tmp_path, teacher_ckpt, name="a.zarr", **LAYOUT)
    b = _cache(tmp_path, teacher_ckpt, name="b.zarr", topk=0, **LAYOUT)
    assert zarr_files(a) == zarr_files(b)
    with open_cache(a) as x, open_cache(b) as y:
        assert stable_attrs(x.attrs) == stable_attrs(y.attrs)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--topk", "-1"], "--topk must be >= 0, got -1"),
        (["--topk", "11"], "--topk 11: more than the 10 classes the teacher outputs"),
        (["--topk", "3", "--keep-members"], "--topk with --keep-members: sparse targets keep"),
    ],
)
def test_bad_k_is_a_one_line_error(tmp_path, runner, teacher_ckpt, extra, fragment):
    out = tmp_path / "c.zarr"
    base = ["--teacher", teacher_ckpt, "--data", "digits:test", "--out", out]
    result = invoke(runner, "precompute-logits", *base, *extra)
    assert_clean_error(result, fragment)
    assert not out.exists() and not (tmp_path / "c.zarr.partial").exists()


def test_inspect_and_verify_show_the_topk_nodes(tmp_path, runner, teacher_ckpt):
    path = _cache(tmp_path, teacher_ckpt, topk=3, **LAYOUT)
    shown = invoke(runner, "inspect", path)
    assert shown.exit_code == 0, shown.output
    assert "topk/values" in shown.output and "top-3 raw logits" in shown.output
    checked = invoke(runner, "verify", path)
    assert checked.exit_code == 0, checked.output


def test_sampled_counts_are_stored_and_verified(tmp_path, teacher_ckpt):
    path = _cache(tmp_path, teacher_ckpt, sample_k=8, sample_values=True, **LAYOUT)
    with open_cache(path) as cache:
        got = cache.sampled()
        assert cache.target_kind == "sampled" and not cache.backend.has(LOGITS)
    assert (got["sample/counts"].astype(int).sum(-1) == 8).all()
    assert got["sample/indices"].dtype == np.int16 and got["sample/counts"].dtype == np.uint8
    assert check_cache(path)[0] == []


def test_sampled_targets_train_kd_at_any_t_only_with_their_values():
    counts_only = {"targets": "sampled", "sample": {"k": 8, "values": False}}
    with_values = {"targets": "sampled", "sample": {"k": 8, "values": True}}
    for loss in ("kd", "soft", "ce"):
        check_targets_for_loss(counts_only, loss, 1.0)
        check_targets_for_loss(with_values, loss, 4.0)
    with pytest.raises(PipelineError, match=r"loss kd at T = 4 \(--temperature\): the cache") as e:
        check_targets_for_loss(counts_only, "kd", 4.0)
    assert "re-run precompute-logits with --sample-values" in str(e.value)
    with pytest.raises(PipelineError, match="loss dkd cannot train from sampled targets"):
        check_targets_for_loss(with_values, "dkd", 1.0)
