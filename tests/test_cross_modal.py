"""Cross-modal distillation (Gupta et al. 2016): the teacher sees one modality, the student
another of the same samples; stage two joins them by sample ids alone.

Two npz files share ids but hold different inputs: the teacher's "RGB" (3, 6, 6) and the
student's "depth" at a lower resolution (1, 3, 3), in another order and only a subset.
"""

import json

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.data import load_transfer_set
from tests.conftest import invoke
from tests.formats import assert_one_line_error, precompute, save_torchscript, tiny_net
from tests.reference import teacher_forward

IDS = np.arange(500, 520)


@pytest.fixture
def modalities(tmp_path, runner):
    """(teacher model, cache of it on the RGB npz, student spec, test spec)."""
    rng = np.random.default_rng(0)
    labels = np.arange(len(IDS)) % 3
    np.savez(tmp_path / "rgb.npz", x=rng.normal(size=(20, 3, 6, 6)), y=labels, ids=IDS)
    order = rng.permutation(20)[:15]  # the student has 15 of the 20 samples, shuffled
    depth = rng.normal(size=(15, 1, 3, 3))
    np.savez(tmp_path / "depth.npz", x=depth, y=labels[order], ids=IDS[order])
    # A held-out student split with the same ids, for evaluate.
    np.savez(tmp_path / "depth_test.npz", x=depth[:6] + 1, y=labels[order][:6], ids=IDS[order][:6])
    model = tiny_net(3, 3)
    teacher = save_torchscript(model, tmp_path / "rgb_teacher.pt")
    cache = tmp_path / "rgb.zarr"
    spec = f"npz:{tmp_path / 'rgb.npz'}"
    result = precompute(runner, teacher, spec, cache)
    assert result.exit_code == 0, result.output
    return model, cache, f"npz:{tmp_path / 'depth.npz'}", f"npz:{tmp_path / 'depth_test.npz'}"


def test_students_join_the_cache_by_sample_id(tmp_path, modalities):
    model, cache, student_spec, _ = modalities
    teacher_ts = load_transfer_set(f"npz:{tmp_path / 'rgb.npz'}")
    student_ts = load_transfer_set(student_spec)
    with open_cache(cache) as c:
        assert c.attrs["data"]["fingerprint"] == teacher_ts.fingerprint()  # the teacher's input
        assert c.attrs["data"]["fingerprint"] != student_ts.fingerprint()
        rows = c.rows_for(student_ts.sample_ids)
        joined = c.logits(np.sort(rows))[np.argsort(np.argsort(rows)), 0]
        teacher = teacher_forward(model, teacher_ts.inputs, c.attrs["shard_rows"])
    # Row k of the join is the teacher's output on the RGB sample with the student's id k.
    rgb_row = {int(i): r for r, i in enumerate(teacher_ts.sample_ids)}
    expected = teacher[[rgb_row[int(i)] for i in student_ts.sample_ids]]
    np.testing.assert_array_equal(joined, expected)


def test_train_and_evaluate_with_cross_modal(tmp_path, runner, modalities):
    _, cache, student_spec, test_spec = modalities
    out = tmp_path / "student"
    args = ["--cache", cache, "--data", student_spec, "--out", out, "--student", "mlp"]
    result = invoke(runner, "train-student", *args, "--epochs", "2", "--cross-modal")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "student.json").read_text())
    assert info["input_shape"] == [1, 3, 3]  # the student's modality, not the teacher's
    metrics = tmp_path / "m.json"
    args = ["--student", out, "--cache", cache, "--data", test_spec, "--out", metrics]
    result = invoke(runner, "evaluate", *args, "--cross-modal")
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["num_samples"] == 6


def test_without_the_flag_the_fingerprint_check_refuses(tmp_path, runner, modalities):
    _, cache, student_spec, _ = modalities
    args = ["--cache", cache, "--data", student_spec, "--out", tmp_path / "s", "--epochs", "1"]
    assert_one_line_error(invoke(runner, "train-student", *args), "built from other data")


def test_a_student_id_missing_from_the_cache_is_named(tmp_path, runner, modalities):
    _, cache, _, _ = modalities
    ids = IDS[:4].copy()
    ids[2] = 999
    np.savez(tmp_path / "stray.npz", x=np.zeros((4, 1, 3, 3)), y=np.zeros(4, int), ids=ids)
    spec = f"npz:{tmp_path / 'stray.npz'}"
    args = ["--cache", cache, "--data", spec, "--out", tmp_path / "s", "--epochs", "1"]
    assert_one_line_error(
        invoke(runner, "train-student", *args, "--cross-modal"),
        "sample ids not in the cache",
        "999",
    )
