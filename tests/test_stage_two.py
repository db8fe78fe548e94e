"""Stage two: students train from the cache alone, and refuse caches they must not use."""

import json
import shutil

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from stages import evaluate, precompute_logits, train_student
from tests.conftest import invoke, live_series
from tests.reference import EVALUATE_BATCH, student_forward

FAST = ["--epochs", "2", "--student", "mlp", "--model-kwargs", '{"hidden": [16]}']


def test_student_trains_after_the_teacher_is_deleted(tmp_path, runner, teacher_ckpt):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, teacher)
    cache = tmp_path / "train.zarr"
    assert (
        invoke(
            runner,
            "precompute-logits",
            "--teacher",
            teacher,
            "--data",
            "digits:train",
            "--out",
            cache,
        ).exit_code
        == 0
    )
    teacher.unlink()
    out = tmp_path / "student"
    result = invoke(
        runner,
        "train-student",
        "--cache",
        cache,
        "--data",
        "digits:train",
        "--out",
        out,
        "--loss",
        "kd",
        "--temperature",
        "3",
        "--alpha",
        "0.5",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    model, info = load_checkpoint(out / "student.pt")
    assert info["config"]["temperature"] == 3.0 and info["config"]["loss_settings"] == {
        "alpha": 0.5
    }
    assert json.loads((out / "student.json").read_text())["num_params"] == info["num_params"]
    assert [step for step, _ in live_series(out, "train/loss")] == [1, 2]


def test_labeled_fraction_and_ce_baseline_use_only_kept_labels(tmp_path, train_cache):
    cfg = TrainStudentConfig(
        model="mlp", model_kwargs={"hidden": [8]}, loss="ce", epochs=1, labeled_fraction=0.1
    )
    out = train_student.run(cfg, train_cache, "digits:train", tmp_path / "ce")
    info = json.loads((out / "student.json").read_text())
    held = round(0.1 * 1437)  # the default holdout: 10% of the labelled rows
    assert info["heldout_rows"] == held
    assert info["data"]["num_labelled"] == round(0.1 * (1437 - held))


def test_refuses_a_cache_built_from_other_data(tmp_path, runner, test_cache):
    result = invoke(
        runner,
        "train-student",
        "--cache",
        test_cache,
        "--data",
        "digits:train",
        "--out",
        tmp_path / "s",
        *FAST,
    )
    assert result.exit_code == 1
    assert "built from other data (digits:test" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_refuses_an_incomplete_cache(tmp_path, runner, train_cache):
    cache = tmp_path / "partial.zarr"
    shutil.copytree(train_cache, cache)
    meta = cache / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    result = invoke(
        runner,
        "train-student",
        "--cache",
        cache,
        "--data",
        "digits:train",
        "--out",
        tmp_path / "s",
        *FAST,
    )
    assert result.exit_code == 1
    assert f"{cache}: cache is incomplete" in result.output


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--temperature", "0", "--temperature must be > 0, got 0.0"),
        ("--temperature", "-2", "--temperature must be > 0, got -2.0"),
        ("--alpha", "1.5", "--alpha must be in [0, 1], got 1.5"),
        ("--alpha", "-0.1", "--alpha must be in [0, 1], got -0.1"),
        ("--loss", "nope", "unknown loss 'nope'"),
    ],
)
def test_bad_hyperparameters(tmp_path, runner, train_cache, option, value, message):
    result = invoke(
        runner,
        "train-student",
        "--cache",
        train_cache,
        "--data",
        "digits:train",
        "--out",
        tmp_path / "s",
        option,
        value,
        *FAST,
    )
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_existing_output_needs_overwrite_and_survives_a_failed_run(
    tmp_path, runner, train_cache, test_cache
):
    out = tmp_path / "s"
    args = ["train-student", "--cache", train_cache, "--data", "digits:train", "--out", out, *FAST]
    assert invoke(runner, *args).exit_code == 0
    before = (out / "student.pt").read_bytes()
    result = invoke(runner, *args)
    assert result.exit_code == 1 and "already exists (pass --overwrite" in result.output
    # A failing --overwrite run (wrong cache) must leave the good student untouched.
    bad = [
        "train-student",
        "--cache",
        test_cache,
        "--data",
        "digits:train",
        "--out",
        out,
        "--overwrite",
        *FAST,
    ]
    assert invoke(runner, *bad).exit_code == 1
    assert (out / "student.pt").read_bytes() == before
    assert invoke(runner, *args, "--overwrite").exit_code == 0


def test_training_is_deterministic(tmp_path, train_cache):
    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2, seed=7)
    a = train_student.run(cfg, train_cache, "digits:train", tmp_path / "a")
    b = train_student.run(cfg, train_cache, "digits:train", tmp_path / "b")
    ma, _ = load_checkpoint(a / "student.pt")
    mb, _ = load_checkpoint(b / "student.pt")
    for (ka, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert np.array_equal(va.numpy(), vb.numpy()), ka


def test_evaluate_metrics_match_hand_computation(tmp_path, train_cache, test_cache):
    import torch

    from pipeline.core.config import EvaluateConfig
    from pipeline.data import load_transfer_set

    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2)
    student = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    result = evaluate.run(EvaluateConfig(), student, test_cache, "digits:test", tmp_path / "m.json")
    ts = load_transfer_set("digits:test")
    model, _ = load_checkpoint(student / "student.pt")
    # On evaluate's own batches: others may round otherwise, and move an argmax.
    s = torch.from_numpy(student_forward(model, ts.inputs, EVALUATE_BATCH)).double()
    with open_cache(test_cache) as cache:
        t = torch.from_numpy(cache.logits()[:, 0]).double()
    p_t = t.softmax(1)
    kl = (p_t * (p_t.log() - s.log_softmax(1))).sum(1).mean().item()
    assert result["accuracy"] == pytest.approx((s.argmax(1).numpy() == ts.labels).mean())
    assert result["teacher_accuracy"] == pytest.approx((t.argmax(1).numpy() == ts.labels).mean())
    assert result["agreement"] == pytest.approx((s.argmax(1) == t.argmax(1)).double().mean().item())
    assert result["kl_teacher_student"] == pytest.approx(kl, rel=1e-6)
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == result["accuracy"]


def test_precompute_refuses_existing_output(tmp_path, teacher_ckpt):
    out = tmp_path / "c.zarr"
    precompute_logits.run(PrecomputeConfig(), [str(teacher_ckpt)], "digits:test", out)
    with pytest.raises(PipelineError, match="already exists"):
        precompute_logits.run(PrecomputeConfig(), [str(teacher_ckpt)], "digits:test", out)
