"""The public Python API (`import pipeline`): the names in `__all__`, the cache read by sample
id, the Dataset wrapper (plain, views, sparse, features, other data refused), the losses as
plain functions, and precompute from Python."""

from __future__ import annotations

import inspect
import json
import sys
import typing

import numpy as np
import pytest
import torch

import pipeline as kd
from tests import procs
from tests.cache.helpers import zarr_files
from tests.reference import teacher_forward


def test_all_names_the_api_and_nothing_else_is_public():
    assert dir(kd) == sorted(kd.__all__)
    for name in kd.__all__:
        value = getattr(kd, name)
        if name == "__version__":
            continue
        assert inspect.getdoc(value), f"{name} has no docstring"
        if inspect.isfunction(value):
            hints = typing.get_type_hints(value)
            assert "return" in hints, f"{name} has no return type"
    with pytest.raises(AttributeError):
        kd.training  # noqa: B018 - a module, not the API


def test_import_pipeline_loads_neither_torch_nor_zarr():
    code = "import sys, pipeline; print(sorted(m for m in ('torch', 'zarr') if m in sys.modules))"
    out = procs.run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cache_targets_are_the_teachers_logits_by_sample_id(train_cache, teacher_ckpt):
    ts = kd.load_transfer_set("digits:train")
    with kd.open_cache(train_cache) as cache:
        reference = teacher_forward(teacher_ckpt, ts.inputs, cache.attrs["shard_rows"])
        ids = ts.sample_ids[[7, 0, 1000, 3]]  # any order
        np.testing.assert_array_equal(cache.targets(ids), reference[[7, 0, 1000, 3]])
        assert cache.targets(ids[:0]).shape == (0, cache.num_classes)
        with pytest.raises(kd.PipelineError, match="sample ids not in the cache: \\[999999\\]"):
            cache.targets([999999])
        with pytest.raises(kd.PipelineError, match="view 1 asked; the cache holds 1"):
            cache.targets(ids, view=1)


def test_teacher_targets_join_a_transfer_set_and_batch_with_default_collate(train_cache):
    ts = kd.load_transfer_set("digits:train")
    data = kd.TeacherTargets(ts, train_cache)
    assert len(data) == len(ts) and data.num_classes == 10 and data.form == "logits"
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=5)))
    assert batch["inputs"].shape == (5, *ts.input_shape) and batch["inputs"].dtype == torch.float32
    np.testing.assert_array_equal(batch["inputs"].numpy(), ts.inputs[:5])
    np.testing.assert_array_equal(batch["labels"].numpy(), ts.labels[:5])
    np.testing.assert_array_equal(batch["ids"].numpy(), ts.sample_ids[:5])
    with kd.open_cache(train_cache) as cache:
        np.testing.assert_array_equal(batch["teacher"].numpy(), cache.targets(ts.sample_ids[:5]))


def test_teacher_targets_refuse_other_data_and_join_any_dataset_by_ids(train_cache):
    test = kd.load_transfer_set("digits:test")
    with pytest.raises(kd.PipelineError, match="fingerprint"):
        kd.TeacherTargets(test, train_cache)  # other data: its fingerprint is not the cache's
    train = kd.load_transfer_set("digits:train")
    rows = np.array([4, 2, 9])
    plain = torch.utils.data.TensorDataset(
        torch.from_numpy(train.inputs[rows]), torch.from_numpy(train.labels[rows])
    )
    data = kd.TeacherTargets(plain, train_cache, ids=train.sample_ids[rows])
    with kd.open_cache(train_cache) as cache:
        expected = cache.targets(train.sample_ids[rows])
    for i in range(3):
        np.testing.assert_array_equal(data[i]["teacher"].numpy(), expected[i])
        assert data[i]["labels"] == train.labels[rows[i]]
    with pytest.raises(kd.PipelineError, match="pass ids="):
        kd.TeacherTargets(plain, train_cache)
    with pytest.raises(kd.PipelineError, match="2 ids for 3 items"):
        kd.TeacherTargets(plain, train_cache, ids=train.sample_ids[:2])
    with pytest.raises(kd.PipelineError, match="sample ids not in the cache"):
        kd.TeacherTargets(plain, train_cache, ids=[-5, -6, -7])


def test_views_serve_the_augmented_input_the_teacher_saw(tmp_path, teacher_ckpt):
    from pipeline.data.views import apply_views, parse_augment

    out = kd.precompute_logits(
        str(teacher_ckpt), "digits:test", tmp_path / "v.zarr", views=3, augment="shift:max=1"
    )
    ts = kd.load_transfer_set("digits:test")
    data = kd.TeacherTargets(ts, out, views=0, seed=5)
    teacher, _ = _load(teacher_ckpt)
    with kd.open_cache(out) as cache:
        seeds = cache.view_seeds()  # (N, V)
        logits = cache.logits()  # (N, V, C)
    seen = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in (0, 11):
            item = data[i]
            view = int(data.plan.of(np.array([i]), epoch)[0])
            seen.add((i, view))
            spec = parse_augment("shift:max=1")
            expected = apply_views(ts.inputs[i : i + 1], seeds[i : i + 1, view], spec)[0]
            np.testing.assert_array_equal(item["inputs"].numpy(), expected)
            np.testing.assert_array_equal(item["teacher"].numpy(), logits[i, view])
            with torch.inference_mode():  # the served target is the teacher on that input
                own = teacher(item["inputs"][None]).numpy()[0]
            np.testing.assert_allclose(item["teacher"].numpy(), own, rtol=1e-5, atol=1e-5)
    assert len(seen) == 6  # each sample cycles through its 3 views over 3 epochs
    with pytest.raises(kd.PipelineError, match="views=4; the cache holds 3"):
        kd.TeacherTargets(ts, out, views=4)


def test_sparse_caches_serve_rebuilt_logits_or_the_distribution_at_t(tmp_path, teacher_ckpt):
    from pipeline.cache.sparse import topk_logits

    topk = kd.precompute_logits(str(teacher_ckpt), "digits:test", tmp_path / "k.zarr", topk=3)
    ts = kd.load_transfer_set("digits:test")
    item = kd.TeacherTargets(ts, topk)[4]
    with kd.open_cache(topk) as cache:
        values, indices, lse = (a[:, 0] for a in cache.topk(slice(4, 5)))
    np.testing.assert_array_equal(
        item["teacher"].numpy(), topk_logits(values, indices, lse, 10).numpy()[0]
    )
    sampled = kd.precompute_logits(
        str(teacher_ckpt), "digits:test", tmp_path / "s.zarr", sample_k=8, sample_values=True
    )
    with pytest.raises(kd.PipelineError, match="pass temperature="):
        kd.TeacherTargets(ts, sampled)
    data = kd.TeacherTargets(ts, sampled, temperature=2.0)
    target = data[4]["teacher"]
    assert data.form == "distribution" and target.shape == (10,)
    assert float(target.sum()) == pytest.approx(1.0, abs=1e-6) and bool((target >= 0).all())
    loss_fn = kd.distillation_loss("kd", 2.0, target=data.form, alpha=1.0)
    student = torch.zeros(1, 10)
    expected = 4.0 * float((target * (target.clamp_min(1e-30).log() - np.log(0.1))).sum())
    assert float(loss_fn(student, target[None], torch.tensor([-1]))) == pytest.approx(expected)


def test_feature_targets_are_served_per_item(tmp_path, teacher_ckpt):
    out = kd.precompute_logits(
        str(teacher_ckpt), "digits:test", tmp_path / "f.zarr", features=["att=0:attention"]
    )
    ts = kd.load_transfer_set("digits:test")
    data = kd.TeacherTargets(ts, out, features=["att"])
    with kd.open_cache(out) as cache:
        expected = cache.feature("att", np.array([6]))[0, 0]
    np.testing.assert_array_equal(data[6]["features"]["att"].numpy(), expected)


def test_losses_are_plain_functions_with_the_registry_defaults():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.tensor([1, -1, 3, -1, 0, 9])
    p_t, log_p_s = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * 4
    ce = torch.nn.functional.cross_entropy(s[y >= 0], y[y >= 0])
    loss = kd.distillation_loss("kd", 2.0)  # alpha 0.9, the registry's default
    assert float(loss(s, t, y)) == pytest.approx(float(0.9 * kl + 0.1 * ce), rel=1e-6)
    same = kd.kd_loss(s, t, y, temperature=2.0, alpha=0.9)
    assert float(same) == pytest.approx(float(loss(s, t, y)), rel=1e-7)
    dkd = kd.distillation_loss("dkd", 4.0, warmup=10)
    ce_only = float(kd.ce_loss(s, None, y))  # dkd = CE + w(epoch)·(alpha·TCKD + beta·NCKD)
    ramped = [float(dkd(s, t, y, epoch=e)) - ce_only for e in (0, 9)]
    assert ramped[0] == pytest.approx(ramped[1] / 10, rel=1e-5)
    with pytest.raises(kd.PipelineError, match="kd.beta: loss kd has no setting 'beta'"):
        kd.distillation_loss("kd", 2.0, beta=1.0)
    with pytest.raises(kd.PipelineError, match="kd.alpha must be in \\[0, 1\\]"):
        kd.distillation_loss("kd", 2.0, alpha=3.0)
    assert {"kd", "dkd", "dist", "ce"} <= set(kd.list_losses())


def test_precompute_from_python_writes_what_the_command_writes(tmp_path, teacher_ckpt, runner):
    from pipeline.cli import cli

    by_python = kd.precompute_logits(str(teacher_ckpt), "digits:test", tmp_path / "py.zarr")
    args = ["precompute-logits", "--teacher", str(teacher_ckpt), "--data", "digits:test"]
    result = runner.invoke(cli, [*args, "--out", str(tmp_path / "cli.zarr")])
    assert result.exit_code == 0, result.output
    assert zarr_files(by_python) == zarr_files(tmp_path / "cli.zarr")  # every file, every byte
    with pytest.raises(kd.PipelineError, match="unknown key 'topkk'"):
        kd.precompute_logits(str(teacher_ckpt), "digits:test", tmp_path / "x.zarr", topkk=3)


def _load(checkpoint):
    from pipeline.models.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    return model.eval(), info


def _accuracy(metrics_file) -> float:
    return json.loads(metrics_file.read_text())["accuracy"]
