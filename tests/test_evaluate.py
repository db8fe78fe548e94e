"""Evaluate: every metric against a hand computation, the teacher from the test cache."""

import json
import math

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.core.config import EvaluateConfig
from pipeline.data import load_transfer_set
from pipeline.evaluate.metrics import expected_calibration_error, loss_settings_of, top_k_accuracy
from pipeline.evaluate.results import METRIC_KEYS, RUN_KEYS, join_result
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from stages import evaluate, train_student
from tests.conftest import invoke
from tests.reference import EVALUATE_BATCH, student_forward
from tests.test_cli_errors import assert_clean_error


def test_top_k_by_hand():
    logits = np.array([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 0]])
    labels = np.array([1, 0, -1])
    assert top_k_accuracy(logits, labels, 1) == 0.0
    assert top_k_accuracy(logits, labels, 2) == 0.5  # row 0: label is second
    assert top_k_accuracy(logits, labels, 6) == 1.0
    assert top_k_accuracy(logits, labels, 50) == 1.0  # k capped at C
    assert top_k_accuracy(logits, np.array([-1, -1, -1]), 1) is None


def test_ece_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right): two bins used.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    want = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    got = expected_calibration_error(np.log(probs), labels, bins=15)
    assert got == pytest.approx(want, rel=1e-9)
    # A perfectly calibrated set scores 0; unlabelled rows are skipped.
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    assert expected_calibration_error(np.log(probs), np.array([0, 1, -1])) == pytest.approx(0)


def test_loss_settings_fall_back_to_the_older_loss_weights():
    assert loss_settings_of({"loss_settings": {"margin": 0.5}}) == {"margin": 0.5}
    assert loss_settings_of({"loss_weights": {"alpha": 0.9}}) == {"alpha": 0.9}
    assert loss_settings_of({"loss_settings": {}, "loss_weights": {"alpha": 0.9}}) == {}
    assert loss_settings_of({}) == {}


def test_evaluate_writes_every_metric(tmp_path, train_cache, test_cache):
    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [16]}, epochs=2, loss="dkd")
    student = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    out = tmp_path / "m.json"
    result = evaluate.run(EvaluateConfig(latency_runs=3), student, test_cache, "digits:test", out)
    numbers = json.loads(out.read_text())
    info = json.loads((tmp_path / "m.info.json").read_text())
    # metrics.json: numbers alone, with stable names; the rest in the sidecar; together they
    # are the whole result.
    assert all(isinstance(v, (int, float)) for v in numbers.values())
    assert set(numbers) == set(METRIC_KEYS)
    assert "config" in info and "accuracy" not in info
    # What was measured (latency, threads) is in the run record alone: the metrics and their
    # sidecar are the same bytes on every run.
    run = json.loads((tmp_path / "m.run.json").read_text())
    assert {k: run[k] for k in RUN_KEYS} == {k: result[k] for k in RUN_KEYS}
    assert not set(RUN_KEYS) & (set(numbers) | set(info))
    whole = {k: v for k, v in json.loads(json.dumps(result)).items() if k not in RUN_KEYS}
    assert join_result(numbers, info) == whole

    ts = load_transfer_set("digits:test")
    model, info = load_checkpoint(student / "student.pt")
    # On evaluate's own batches: others may round otherwise, and move an argmax or an ECE bin.
    s = student_forward(model, ts.inputs, EVALUATE_BATCH).astype(np.float64)
    with open_cache(test_cache) as cache:
        t = cache.logits()[:, 0].astype(np.float64)
    y = ts.labels
    top5 = np.mean([y[i] in np.argsort(-s[i])[:5] for i in range(len(y))])
    assert result["top5_accuracy"] == pytest.approx(top5)
    assert result["teacher_accuracy"] == pytest.approx(np.mean(t.argmax(1) == y))
    assert result["ece"] == pytest.approx(expected_calibration_error(s, y, 15))
    assert result["teacher_ece"] == pytest.approx(expected_calibration_error(t, y, 15))
    assert result["num_params"] == sum(p.numel() for p in model.parameters())
    assert result["size_bytes"] == (student / "student.pt").stat().st_size
    # The MLP 64 → 16 → 10: a multiply and an add per weight.
    assert result["flops_per_sample"] == 2 * (64 * 16 + 16 * 10)
    assert set(result["latency_ms_per_sample"]) == {"1", "256"}
    assert all(v > 0 and math.isfinite(v) for v in result["latency_ms_per_sample"].values())
    assert result["loss"] == "dkd"
    assert result["loss_settings"] == {"alpha": 1.0, "beta": 8.0, "warmup": 20.0}
    assert result["alpha"] == 1.0
    assert result["teacher"]["models"] == ["cnn"]


def test_evaluate_refuses_a_student_of_another_class_count(tmp_path, runner, test_cache):
    from pipeline.models import create_model
    from pipeline.models.checkpoint import save_checkpoint

    student = tmp_path / "five"
    student.mkdir()
    meta = {
        "name": "five",
        "model": "mlp",
        "model_kwargs": {},
        "num_classes": 5,
        "input_shape": [1, 8, 8],
        "num_params": 0,
        "config": {},
    }
    save_checkpoint(student / "student.pt", create_model("mlp", 5, (1, 8, 8)), meta)
    result = invoke(
        runner,
        "evaluate",
        "--student",
        student,
        "--cache",
        test_cache,
        "--data",
        "digits:test",
        "--out",
        tmp_path / "m.json",
    )
    assert_clean_error(result, "student has 5 classes but cache", "has 10")
    assert not (tmp_path / "m.json").exists()


def test_evaluate_refuses_a_test_cache_of_another_teacher_unless_told(
    tmp_path, runner, train_cache, teacher_ckpt_mlp
):
    """Agreement and KL against a teacher the student never saw are not what they claim."""
    from pipeline.core.config import PrecomputeConfig
    from stages import precompute_logits

    other = precompute_logits.run(
        PrecomputeConfig(), [str(teacher_ckpt_mlp)], "digits:test", tmp_path / "other.zarr"
    )
    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [8]}, epochs=1)
    student = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    args = ["evaluate", "--student", student, "--cache", other, "--data", "digits:test",
            "--latency-runs", "0"]  # fmt: skip
    refused = invoke(runner, *args, "--out", tmp_path / "m.json")
    assert_clean_error(refused, "was made by another teacher (mlp", "--other-teacher")
    assert not (tmp_path / "m.json").exists()
    allowed = invoke(runner, *args, "--out", tmp_path / "m.json", "--other-teacher")
    assert allowed.exit_code == 0, allowed.output
    info = json.loads((tmp_path / "m.info.json").read_text())
    assert info["teacher"]["models"] == ["mlp"] and info["teacher"]["combine"] == "mean-logits"


def test_evaluate_out_must_be_json(tmp_path, runner, train_cache, test_cache):
    """Metrics are JSON: `--out metrics/x.csv` is refused, not filled with JSON."""
    from tests.test_cli_errors import assert_clean_error

    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [8]}, epochs=1)
    student = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    out = tmp_path / "x.csv"
    result = invoke(runner, "evaluate", "--student", student, "--cache", test_cache,
                    "--data", "digits:test", "--out", out)  # fmt: skip
    assert_clean_error(result, f"--out {out}: expected a .json file")
    assert not out.exists()


def test_a_student_with_non_finite_weights_is_refused_and_no_json_holds_nan(
    tmp_path, runner, train_cache, test_cache
):
    """A student whose outputs are NaN has no accuracy: one line, no metrics file, instead of
    bare NaN in a JSON file that strict readers refuse."""
    import torch

    from pipeline.core.fsutil import json_text

    cfg = TrainStudentConfig(model="mlp", model_kwargs={"hidden": [8]}, epochs=1)
    student = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    payload = torch.load(student / "student.pt", weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first].fill_(float("nan"))
    torch.save(payload, student / "student.pt")
    out = tmp_path / "m.json"
    result = invoke(runner, "evaluate", "--student", student, "--cache", test_cache,
                    "--data", "digits:test", "--out", out)  # fmt: skip
    assert_clean_error(result, "outputs NaN/Inf for 360 test samples", "retrain it")
    assert not out.exists()
    text = json_text({"a": float("nan"), "b": [1.0, float("inf")], "c": 0.5})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 0.5}  # strict JSON: null
