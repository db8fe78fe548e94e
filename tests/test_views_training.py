"""Stage two on a cache of augmented views: each epoch trains every sample on one view, its
input regenerated from the stored seed, byte for byte the input the teacher saw."""

import json

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.core.training import TrainData
from pipeline.data import load_transfer_set
from pipeline.data.views import Views, apply_views
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import open_targets, plan_views
from stages import precompute_logits, train_student
from tests.conftest import invoke

V = 3
SPEC = "shift:max=1,flip"


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, teacher_ckpt):
    """digits:train under 3 seeded views (shift, flip), in shards of 128 rows."""
    out = tmp_path_factory.mktemp("views") / "train.zarr"
    cfg = PrecomputeConfig(views=V, augment=SPEC, seed=7, chunk_rows=64, chunks_per_shard=2)
    return precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:train", out)


def _epoch(cache, mode, epoch, seed=0):
    """Every (row, input, teacher logits, view seed) one epoch serves, through TrainData."""
    ts = load_transfer_set("digits:train")
    targets, attrs = open_targets(cache, ts, mode=mode, budget="512KiB")
    views = Views.from_attrs(attrs)
    served = targets.with_plan(plan_views(V, ts.sample_ids, seed))
    data = TrainData(
        torch.from_numpy(ts.inputs),
        torch.from_numpy(ts.labels),
        served,
        augment=lambda x, seeds: apply_views(x, seeds, views.spec),
    )
    rows, xs, logits, seeds = [], [], [], []
    order = iter(served.epoch(epoch, 64, seed))
    for x, _, batch in data.batches(epoch, 64, seed):
        r, _ = next(order)
        rows.append(r), xs.append(x), logits.append(batch.logits), seeds.append(batch.seeds)
    return np.concatenate(rows), torch.cat(xs), torch.cat(logits), np.concatenate(seeds)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_student_inputs_are_the_views_the_teacher_saw(view_cache, teacher_ckpt, mode):
    ts = load_transfer_set("digits:train")
    rows, x, logits, seeds = _epoch(view_cache, mode, epoch=1)
    assert sorted(rows) == list(range(len(ts)))
    with open_cache(view_cache) as cache:
        stored_seeds, stored_logits = cache.view_seeds(), cache.logits()  # (N, V), (N, V, C)
        spec = Views.from_attrs(cache.attrs).spec
    view = (1 + plan_views(V, ts.sample_ids, 0).offsets[rows]) % V
    assert (seeds == stored_seeds[rows, view]).all()
    assert torch.equal(logits, torch.from_numpy(stored_logits[rows, view]))
    expected = apply_views(ts.inputs[rows], stored_seeds[rows, view], spec)
    assert x.numpy().tobytes() == expected.tobytes()  # byte for byte what the teacher saw
    teacher, _ = load_checkpoint(teacher_ckpt)
    with torch.no_grad():
        again = teacher.eval()(x[:256])
    # Shuffled rows of several views, not precompute's batches: kernels may round otherwise.
    assert torch.allclose(again, logits[:256], atol=1e-5)
    assert not torch.equal(x, torch.from_numpy(ts.inputs[rows]))  # augmented, not raw


def test_each_sample_cycles_through_its_views(view_cache):
    ts = load_transfer_set("digits:train")
    plan = plan_views(V, ts.sample_ids, 0)
    seen = np.stack([plan.of(np.arange(len(ts)), e) for e in range(2 * V)])  # (2V, N)
    assert all(sorted(seen[:V, i]) == list(range(V)) for i in range(0, len(ts), 97))
    assert (seen[:V] == seen[V:]).all()  # fewer views than epochs: they cycle
    assert len(set(plan.offsets.tolist())) == V  # the samples do not move in lockstep
    again = plan_views(V, ts.sample_ids[::-1], 0).offsets[::-1]
    assert (again == plan.offsets).all()  # a function of the sample id, not the row


def test_train_student_on_views_records_them_and_refuses_more_than_cached(tmp_path, view_cache):
    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2)
    out = train_student.run(cfg, view_cache, "digits:train", tmp_path / "s")
    info = json.loads((out / "student.json").read_text())
    assert info["cache"]["views"]["augment"] == "shift:max=1,flip:p=0.5"
    assert info["config"]["views"] == 0
    two = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2, views=2)
    train_student.run(two, view_cache, "digits:train", tmp_path / "two")
    with pytest.raises(PipelineError, match=r"views 4: the cache holds 3 view\(s\)"):
        train_student.run(
            TrainStudentConfig(epochs=1, views=4), view_cache, "digits:train", tmp_path / "x"
        )


def test_views_option_on_a_one_view_cache_is_one_line(tmp_path, runner, train_cache):
    from tests.test_cli_errors import assert_clean_error

    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train",
        "--out", tmp_path / "s", "--views", "2",
    )  # fmt: skip
    assert_clean_error(result, "--views 2: the cache holds 1 view(s) per sample")
    assert not (tmp_path / "s").exists()


def test_evaluate_refuses_a_test_cache_of_augmented_views(tmp_path, runner, view_cache):
    from tests.test_cli_errors import assert_clean_error

    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=1)
    student = train_student.run(cfg, view_cache, "digits:train", tmp_path / "s")
    result = invoke(
        runner, "evaluate", "--student", student, "--cache", view_cache,
        "--data", "digits:train", "--out", tmp_path / "m.json",
    )  # fmt: skip
    assert_clean_error(result, "its teacher outputs are of augmented views (shift:max=1")
    assert not (tmp_path / "m.json").exists()
