"""Outputs never destroy the run's own inputs, one run writes an output at a time, an
interrupted student is never silently restarted, and malformed checkpoints are one line."""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.fsutil import OutputLock
from pipeline.core.lock import KILL_AT_ENV
from pipeline.core.training import Trainee
from pipeline.models import create_model
from pipeline.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from tests import procs
from tests.conftest import invoke, live_series
from tests.test_cli_errors import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--student", "mlp", "--model-kwargs", '{"hidden": [16]}', "--batch-size", "128")


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) with its bytes."""
    path = Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def assert_refused(result, out, source, relation="is"):
    """Refused in one line naming the output, the input and how they collide."""
    assert_clean_error(result, str(out), str(source), f" {relation} the input ")


@pytest.fixture
def npz_data(tmp_path) -> Path:
    """A local data file (the check runs before it is read, so any bytes do)."""
    path = tmp_path / "data" / "train.npz"
    path.parent.mkdir()
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 10)
    return path


@pytest.fixture
def student_dir(tmp_path) -> Path:
    """A student directory (mlp on digits' 1x8x8 inputs) written as train-student does."""
    out = tmp_path / "student"
    out.mkdir()
    torch.save(checkpoint_payload(), out / "student.pt")
    (out / "student.json").write_text("{}\n")
    return out


def checkpoint_payload() -> dict:
    torch.manual_seed(0)
    net = create_model("mlp", 10, (1, 8, 8), hidden=[16])
    return {
        "format": CHECKPOINT_FORMAT,
        "role": "student",
        "model": "mlp",
        "model_kwargs": {"hidden": [16]},
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "state_dict": net.state_dict(),
    }


# -- an output that is one of the run's inputs --------------------------------------------


def train(runner, cache, data, out, *extra):
    args = ("--cache", cache, "--data", data, "--out", out, "--epochs", "1", *TINY, *extra)
    return invoke(runner, "train-student", *args)


def test_train_student_out_is_the_cache(runner, train_cache):
    before = snapshot(train_cache)
    result = train(runner, train_cache, "digits:train", train_cache, "--overwrite")
    assert_refused(result, train_cache, train_cache)
    assert "--out" in result.output and "--cache" in result.output
    assert snapshot(train_cache) == before


def test_train_student_out_inside_the_cache(runner, train_cache):
    before = snapshot(train_cache)
    out = train_cache / "students" / "s"
    result = train(runner, train_cache, "digits:train", out, "--overwrite")
    assert_refused(result, out, train_cache, "is inside")
    assert snapshot(train_cache) == before


def test_train_student_out_is_a_symlink_to_the_cache(tmp_path, runner, train_cache):
    before = snapshot(train_cache)
    link = tmp_path / "link"
    link.symlink_to(train_cache, target_is_directory=True)
    result = train(runner, train_cache, "digits:train", link, "--overwrite")
    assert_refused(result, link, train_cache)
    assert link.is_symlink() and snapshot(train_cache) == before


def test_train_student_out_contains_the_data_file(runner, train_cache, npz_data):
    before = snapshot(npz_data)
    out = npz_data.parent
    result = train(runner, train_cache, f"npz:{npz_data}?std=1", out, "--overwrite")
    assert_refused(result, out, npz_data, "contains")
    assert "--data" in result.output
    assert snapshot(npz_data) == before


def test_train_student_out_is_or_is_inside_the_data_dir(tmp_path, runner, train_cache):
    photos = tmp_path / "photos"
    (photos / "cat").mkdir(parents=True)
    (photos / "cat" / "a.png").write_bytes(b"png")
    before = snapshot(photos)
    for out, relation in ((photos, "is"), (photos / "students" / "s", "is inside")):
        data = f"imagefolder:{photos}?size=8#ignored"
        result = train(runner, train_cache, data, out, "--overwrite")
        assert_refused(result, out, photos, relation)
    assert snapshot(photos) == before


def test_train_student_resume_checkpoint_is_the_cache(tmp_path, runner):
    cache = tmp_path / "s.resume.pt"  # what --out s writes its per-epoch state to
    cache.write_bytes(b"a cache the user named oddly")
    result = train(runner, cache, "digits:train", tmp_path / "s", "--overwrite")
    assert_refused(result, cache, cache)
    assert "resume checkpoint" in result.output
    assert cache.read_bytes() == b"a cache the user named oddly"


def test_train_students_out_dir_inside_the_cache(runner, train_cache):
    before = snapshot(train_cache)
    out_dir = train_cache / "sweep"
    args = ("--cache", train_cache, "--data", "digits:train", "--out-dir", out_dir)
    result = invoke(
        runner, "train-students", *args, "--students", "mlp", "--losses", "kd",
        "--temperatures", "2", "--epochs", "1", "--overwrite",
    )  # fmt: skip
    assert_refused(result, out_dir, train_cache, "is inside")
    assert "--out-dir" in result.output
    assert snapshot(train_cache) == before


def test_precompute_out_is_the_teacher(tmp_path, runner, teacher_ckpt):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_ckpt.read_bytes())
    args = ("--teacher", teacher, "--data", "digits:train", "--out", teacher, "--overwrite")
    result = invoke(runner, "precompute-logits", *args)
    assert_refused(result, teacher, teacher)
    assert "--teacher" in result.output
    assert teacher.read_bytes() == teacher_ckpt.read_bytes()


def test_precompute_out_is_a_factory_weights_file(tmp_path, runner):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"weights")
    teacher = f"mypkg.nets:build@{weights}"
    args = ("--teacher", teacher, "--data", "digits:train", "--out", weights, "--overwrite")
    result = invoke(runner, "precompute-logits", *args)
    assert_refused(result, weights, weights)
    assert weights.read_bytes() == b"weights"


def test_precompute_out_is_the_data(runner, teacher_ckpt, npz_data):
    before = snapshot(npz_data)
    data = f"npz:{npz_data}"
    args = ("--teacher", teacher_ckpt, "--data", data, "--out", npz_data, "--overwrite")
    result = invoke(runner, "precompute-logits", *args)
    assert_refused(result, npz_data, npz_data)
    assert snapshot(npz_data) == before


def evaluate(runner, student, cache, data, out):
    args = ("--student", student, "--cache", cache, "--data", data, "--out", out)
    return invoke(runner, "evaluate", *args, "--overwrite")


def test_evaluate_out_is_the_students_own_json(runner, student_dir, test_cache):
    before = snapshot(student_dir)
    out = student_dir / "student.json"
    result = evaluate(runner, student_dir, test_cache, "digits:test", out)
    assert_refused(result, out, student_dir, "is inside")
    assert "--student" in result.output
    assert snapshot(student_dir) == before


def test_evaluate_out_is_the_cache_or_the_data(tmp_path, runner, student_dir, npz_data):
    cache = tmp_path / "test.h5"
    cache.write_bytes(b"cache")
    data = f"npz:{npz_data}"
    result = evaluate(runner, student_dir, cache, data, cache)
    assert_refused(result, cache, cache)
    result = evaluate(runner, student_dir, cache, data, npz_data)
    assert_refused(result, npz_data, npz_data)
    assert cache.read_bytes() == b"cache" and npz_data.is_file()


def test_export_out_inside_the_student(runner, student_dir):
    before = snapshot(student_dir)
    for out in (student_dir / "student.pt", student_dir / "exported.pt"):
        result = invoke(runner, "export", "--student", student_dir, "--out", out, "--overwrite")
        assert_refused(result, out, student_dir, "is inside")
    assert snapshot(student_dir) == before


def test_train_teacher_out_is_the_data(runner, npz_data):
    before = snapshot(npz_data)
    args = ("--data", f"npz:{npz_data}", "--model", "mlp", "--epochs", "1")
    result = invoke(runner, "train-teacher", *args, "--out", npz_data, "--overwrite")
    assert_refused(result, npz_data, npz_data)
    assert snapshot(npz_data) == before


def test_digits_spec_names_no_file(tmp_path, runner, train_cache, monkeypatch):
    """`digits:train` is no path: a `train` directory in the working directory is no input."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    result = train(runner, train_cache, "digits:train", "train/s")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "train" / "s" / "student.pt").is_file()


# -- one run per output ---------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, runner, train_cache):
    out = tmp_path / "s"
    held = OutputLock(out)  # what a running train-student of the same output holds
    held.acquire()
    try:
        result = train(runner, train_cache, "digits:train", out)
        assert_clean_error(result, str(out), "being written by another process")
        result = train(runner, train_cache, "digits:train", out, "--overwrite")
        assert_clean_error(result, "being written by another process")
        assert not out.exists()
    finally:
        held.release()
    assert train(runner, train_cache, "digits:train", out).exit_code == 0
    assert not held.path.exists()  # released on success


def test_the_lock_is_released_on_failure(tmp_path, runner, train_cache):
    out = tmp_path / "s"
    out.mkdir()
    result = train(runner, train_cache, "digits:train", out)  # exists: refused
    assert_clean_error(result, "already exists")
    lock = OutputLock(out)
    lock.acquire()  # free again
    lock.release()


def test_train_students_locks_every_output(tmp_path, runner, train_cache):
    out_dir = tmp_path / "sweep"
    held = OutputLock(out_dir / "mlp-ce")
    held.acquire()
    try:
        args = ("--cache", train_cache, "--data", "digits:train", "--out-dir", out_dir)
        result = invoke(
            runner, "train-students", *args, "--students", "mlp", "--losses", "kd",
            "--temperatures", "2", "--epochs", "1",
        )  # fmt: skip
        assert_clean_error(result, "mlp-ce", "being written by another process")
    finally:
        held.release()
    assert not (out_dir / "mlp-kd-t2").exists()


# -- an interrupted student ---------------------------------------------------------------

RUN = ("--epochs", "3", "--optimizer", "sgd", "--lr", "0.05", "--seed", "0")


def interrupt_after_epoch_two(monkeypatch):
    save = Trainee.save

    def crash(self):
        save(self)
        if self.epochs_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainee, "save", crash)
    return save


def count_epochs(monkeypatch) -> list[int]:
    """Epochs trained from here on, as (1-based) numbers."""
    seen = []
    end_epoch = Trainee.end_epoch

    def spy(self, labelled):
        row = end_epoch(self, labelled)
        seen.append(row["epoch"])
        return row

    monkeypatch.setattr(Trainee, "end_epoch", spy)
    return seen


def same_weights(a: Path, b: Path) -> bool:
    sa = load_checkpoint(a / "student.pt")[0].state_dict()
    sb = load_checkpoint(b / "student.pt")[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def interrupted(tmp_path, runner, train_cache, monkeypatch):
    """(output, its resume checkpoint) of a run killed after epoch 2 of 3."""
    out = tmp_path / "s"
    save = interrupt_after_epoch_two(monkeypatch)
    result = train(runner, train_cache, "digits:train", out, *RUN)
    assert result.exit_code != 0  # click reports the KeyboardInterrupt as "Aborted!"
    monkeypatch.setattr(Trainee, "save", save)
    resume = tmp_path / "s.resume.pt"
    assert not out.exists() and resume.is_file()
    assert not OutputLock(out).path.exists()  # released on failure
    return out, resume


@pytest.fixture
def straight(tmp_path, runner, train_cache):
    out = tmp_path / "straight"
    assert train(runner, train_cache, "digits:train", out, *RUN).exit_code == 0
    return out


def test_the_same_command_after_a_kill_is_refused(runner, train_cache, interrupted):
    out, resume = interrupted
    before = resume.read_bytes()
    result = train(runner, train_cache, "digits:train", out, *RUN)
    assert_clean_error(result, str(resume), "2 epochs done", "--resume continues", "--overwrite")
    assert resume.read_bytes() == before and not out.exists()


def test_overwrite_discards_the_checkpoint_and_starts_afresh(
    runner, train_cache, interrupted, straight, monkeypatch
):
    out, resume = interrupted
    epochs = count_epochs(monkeypatch)
    result = train(runner, train_cache, "digits:train", out, *RUN, "--overwrite")
    assert result.exit_code == 0, result.output
    assert epochs == [1, 2, 3]
    assert same_weights(straight, out) and not resume.exists()


def test_resume_continues_the_checkpoint(runner, train_cache, interrupted, straight, monkeypatch):
    out, resume = interrupted
    epochs = count_epochs(monkeypatch)
    result = train(runner, train_cache, "digits:train", out, *RUN, "--resume")
    assert result.exit_code == 0, result.output
    assert epochs == [3]
    assert same_weights(straight, out) and not resume.exists()
    assert [step for step, _ in live_series(out, "train/loss")] == [1, 2, 3]


# -- malformed checkpoints ------------------------------------------------------------------


def _drop(key):
    return lambda p: p.pop(key)


def _set(key, value):
    return lambda p: p.__setitem__(key, value)


def _state(change):
    return lambda p: change(p["state_dict"])


MALFORMED = {
    "not a dict": (lambda p: None, "not a kd-pipeline checkpoint"),
    "no format": (_drop("format"), "not a kd-pipeline checkpoint"),
    "no model": (_drop("model"), "no key 'model'"),
    "no num_classes": (_drop("num_classes"), "no key 'num_classes'"),
    "no input_shape": (_drop("input_shape"), "no key 'input_shape'"),
    "no state_dict": (_drop("state_dict"), "no key 'state_dict'"),
    "model not a str": (_set("model", 5), "model is 5, expected a model name"),
    "num_classes a str": (_set("num_classes", "ten"), "num_classes is 'ten'"),
    "input_shape a str": (_set("input_shape", "1x8x8"), "input_shape is '1x8x8'"),
    "model_kwargs a list": (_set("model_kwargs", [16]), "model_kwargs is [16]"),
    "state_dict a list": (_set("state_dict", [1, 2]), "state_dict is [1, 2]"),
    "state_dict of numbers": (_state(lambda s: s.__setitem__("1.bias", 3)), "a dict of named"),
    "gone model": (_set("model", "gone_net"), "cannot rebuild its model: unknown model"),
    "bad model kwargs": (_set("model_kwargs", {"depth": 3}), "cannot rebuild its model"),
    "wrong shape": (
        _state(lambda s: s.__setitem__("3.weight", torch.zeros(10, 32))),
        "wrong shape: 3.weight (10, 32) (model: (10, 16))",
    ),
    "missing weights": (_state(lambda s: s.pop("3.bias")), "missing: 3.bias"),
    "unexpected weights": (
        _state(lambda s: s.update({f"x{i}": torch.zeros(1) for i in range(5)})),
        "unexpected: x0, x1, x2 (+2 more)",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_is_one_line(case, tmp_path, runner, student_dir, test_cache):
    change, message = MALFORMED[case]
    payload = checkpoint_payload()
    change(payload)
    ckpt = student_dir / "student.pt"
    torch.save([1, 2, 3] if case == "not a dict" else payload, ckpt)
    result = invoke(runner, "export", "--student", student_dir, "--out", tmp_path / "x.pt")
    assert_clean_error(result, str(ckpt), message)
    result = evaluate(runner, student_dir, test_cache, "digits:test", tmp_path / "m.json")
    assert_clean_error(result, str(ckpt), message)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_an_out_that_appears_during_the_run_is_not_replaced_without_overwrite(
    tmp_path, runner, teacher_ckpt, monkeypatch, suffix
):
    """OUT was free when the run started; someone puts a file there while it runs. The
    finished cache does not replace it; the work is kept, and --overwrite finishes it."""
    from pipeline.cache import open_cache
    from pipeline.teacher import shards

    out = tmp_path / f"c{suffix}"
    forward = shards._forward

    def someone_writes_out(*a, **kw):
        if not out.exists():
            out.write_text("the user's own file")
        return forward(*a, **kw)

    monkeypatch.setattr(shards, "_forward", someone_writes_out)
    args = ["precompute-logits", "--teacher", teacher_ckpt, "--data", "digits:test", "--out", out]
    result = invoke(runner, *args)
    assert_clean_error(result, f"{out} appeared while this run was writing it")
    assert out.read_text() == "the user's own file"
    assert (tmp_path / f"c{suffix}.partial").is_dir()  # the work is kept
    assert not list(tmp_path.glob("*.tmp-*")) and not (tmp_path / f"c{suffix}.lock").exists()
    monkeypatch.setattr(shards, "_forward", forward)
    if suffix == ".zarr":  # a whole cache: moved into place by hand, it reads
        out.unlink()
        (tmp_path / "c.zarr.partial").rename(out)
    else:
        assert invoke(runner, *args, "--overwrite").exit_code == 0
    with open_cache(out) as cache:
        assert cache.complete and cache.logits().shape == (360, 1, 10)


def test_a_small_artifact_that_appears_during_the_run_is_not_replaced(tmp_path, monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.core.fsutil import atomic_output

    out = tmp_path / "m.json"
    with pytest.raises(PipelineError, match="appeared while this run was writing it"):
        with atomic_output(out, overwrite=False) as tmp:
            tmp.write_text("{}")
            out.write_text("theirs")
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# -- side files: a user's are never taken, a killed run's are cleaned up ------------------


def test_a_training_log_folder_that_is_not_ours_is_refused_not_taken(tmp_path, runner, train_cache):
    out = tmp_path / "s"
    mine = tmp_path / "s.dvclive"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own curves\n")
    result = train(runner, train_cache, "digits:train", out)
    assert_clean_error(result, str(mine), "is not a training log of kd-pipeline")
    assert (mine / "notes.txt").read_text() == "my own curves\n" and not out.exists()


@pytest.mark.slow
def test_train_student_killed_after_the_move_leaves_nothing_after_the_next_run(
    tmp_path, train_cache
):
    out = tmp_path / "s"
    args = ["train-student", "--cache", str(train_cache), "--data", "digits:train"]
    args += ["--out", str(out), "--epochs", "1", *TINY, "--overwrite"]
    env = {**os.environ, KILL_AT_ENV: f"swap-moved:{out.name}"}
    killed = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s."))
    assert "s.lock" in left and not any(n.startswith("s.tmp-") for n in left)
    assert (out / "student.pt").is_file()  # the new student is in place

    again = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s")) == [
        "s",
        "s.run.json",
    ]
