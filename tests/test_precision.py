"""Mixed precision: autocast for the forward pass and loss, a gradient scaler for fp16."""

import json

import pytest
import torch

from pipeline.core.training import Trainee
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from stages import train_student
from tests.conftest import invoke

SMALL = {"model": "mlp", "model_kwargs": {"hidden": [32]}, "epochs": 4}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, train_cache):
    out = tmp_path_factory.mktemp("fp32") / "s"
    return train_student.run(TrainStudentConfig(**SMALL), train_cache, "digits:train", out)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_about_as_well_and_really_casts(
    tmp_path, train_cache, fp32, precision
):
    cfg = TrainStudentConfig(**SMALL, precision=precision)
    out = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    final = json.loads((out / "student.json").read_text())["final"]
    reference = json.loads((fp32 / "student.json").read_text())["final"]
    assert abs(final["heldout_accuracy"] - reference["heldout_accuracy"]) <= 0.05
    assert final["loss"] == pytest.approx(reference["loss"], rel=0.05)
    a, b = (load_checkpoint(p / "student.pt")[0].state_dict() for p in (out, fp32))
    assert all(v.dtype == torch.float32 for v in a.values())  # weights stay fp32
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the forward pass was really cast


def test_fp16_resume_keeps_the_gradient_scaler(tmp_path, train_cache, monkeypatch):
    cfg = TrainStudentConfig(**SMALL, precision="fp16")
    straight = train_student.run(cfg, train_cache, "digits:train", tmp_path / "straight")
    save = Trainee.save

    def crash_after_epoch_two(self):
        save(self)
        if self.epochs_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainee, "save", crash_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_student.run(cfg, train_cache, "digits:train", tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed.resume.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    monkeypatch.setattr(Trainee, "save", save)
    out = train_student.run(cfg, train_cache, "digits:train", tmp_path / "resumed", resume=True)
    a, b = (load_checkpoint(p / "student.pt")[0].state_dict() for p in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_precision_is_a_choice_error(tmp_path, runner, train_cache):
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train",
        "--out", tmp_path / "s", "--precision", "fp8",
    )  # fmt: skip
    assert result.exit_code == 2 and "'fp8' is not one of 'fp32', 'bf16', 'fp16'" in result.output


def test_precompute_in_bf16_is_close_to_fp32_and_recorded(tmp_path, teacher_ckpt):
    from pipeline.cache import open_cache
    from pipeline.core.config import PrecomputeConfig
    from stages import precompute_logits

    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = PrecomputeConfig(precision=precision)
        out = tmp_path / f"{precision}.zarr"
        precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", out)
        with open_cache(out) as cache:
            runs[precision] = (cache.logits()[:, 0], cache.attrs["params"])
    (full, p32), (half, p16) = runs["fp32"], runs["bf16"]
    assert "precision" not in p32 and p16["precision"] == "bf16"  # fp32 caches as before
    assert half.dtype == full.dtype and not (half == full).all()  # really ran in bf16
    assert abs(half - full).max() < 0.1 * abs(full).max()
    assert (half.argmax(1) == full.argmax(1)).mean() > 0.95


def test_precompute_precision_is_a_choice(tmp_path, runner, teacher_ckpt):
    result = invoke(
        runner, "precompute-logits", "--teacher", teacher_ckpt, "--data", "digits:test",
        "--out", tmp_path / "c.zarr", "--precision", "int8",
    )  # fmt: skip
    assert result.exit_code == 2 and "'int8' is not one of 'fp32', 'bf16', 'fp16'" in result.output
    assert not (tmp_path / "c.zarr").exists()
