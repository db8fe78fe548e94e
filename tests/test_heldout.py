"""Live training metrics: the held-out slice, its per-epoch accuracy, the DVCLive files and the
one-line summary at the end of a run."""

import hashlib
import json

import numpy as np
import pytest
import torch

from pipeline.core.config import PrecomputeConfig
from pipeline.data import holdout_mask, load_transfer_set, mask_labels
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import open_targets
from stages import precompute_logits, train_student
from tests.conftest import invoke, live_series
from tests.reference import MEASURE_BATCH, student_forward

SMALL = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 3, "batch_size": 64}


def test_holdout_is_a_seeded_slice_of_the_labelled_rows_disjoint_from_training_labels():
    labels = np.array([-1, 0, 1, 2, -1, 3, 4, 5, 6, 7, 8, 9] * 10)
    held = holdout_mask(labels, 0.25, seed=3)
    assert held.sum() == round(0.25 * (labels >= 0).sum())  # 25 of 100 labelled rows
    assert (labels[held] >= 0).all()  # only rows with a label can measure accuracy
    assert (holdout_mask(labels, 0.25, seed=3) == held).all()
    assert not (holdout_mask(labels, 0.25, seed=4) == held).all()
    kept = mask_labels(np.where(held, -1, labels), 1.0, seed=3)
    assert (kept[held] == -1).all() and (kept[~held] == labels[~held]).all()
    assert not holdout_mask(labels, 0.0, seed=3).any()
    assert not holdout_mask(np.full(10, -1), 0.5, seed=0).any()  # no labels: nothing held


@pytest.fixture(scope="module")
def sharded_cache(tmp_path_factory, teacher_ckpt):
    """digits:train in shards of 128 rows, so streaming reads it shard by shard."""
    out = tmp_path_factory.mktemp("sharded") / "train.zarr"
    cfg = PrecomputeConfig(chunk_rows=64, chunks_per_shard=2)
    return precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:train", out)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_restricted_targets_serve_exactly_the_kept_rows_with_their_logits(sharded_cache, mode):
    ts = load_transfer_set("digits:train")
    full, _ = open_targets(sharded_cache, ts, mode="memory")
    targets, _ = open_targets(sharded_cache, ts, mode=mode, budget="256KiB")
    assert targets.mode == mode
    keep = np.flatnonzero(~holdout_mask(ts.labels, 0.3, seed=0))
    restricted = targets.restrict(keep)
    assert restricted.num_rows == len(keep)
    rows, logits = [], []
    for r, batch in restricted.epoch(0, 64, seed=0):
        rows.append(r)
        logits.append(batch.logits)
    rows = np.concatenate(rows)
    assert sorted(rows) == list(range(len(keep)))  # every kept row once, renumbered
    expected = full.logits[torch.from_numpy(keep[rows]), 0]  # (N, V, C): the one view
    assert torch.equal(torch.cat(logits), expected)


def test_heldout_accuracy_is_the_final_models_accuracy_on_the_held_rows(tmp_path, train_cache):
    cfg = TrainStudentConfig(**SMALL, holdout=0.2, labeled_fraction=0.5, seed=5)
    out = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    info = json.loads((out / "student.json").read_text())
    ts = load_transfer_set("digits:train")
    held = holdout_mask(ts.labels, 0.2, seed=5)
    model, _ = load_checkpoint(out / "student.pt")
    # On the training's own held-out batches: others may round otherwise, and move an argmax.
    pred = student_forward(model, ts.inputs[held], MEASURE_BATCH).argmax(1)
    accuracy = float((pred == ts.labels[held]).mean())
    assert info["heldout_rows"] == held.sum() == round(0.2 * len(ts))
    assert info["final"]["heldout_accuracy"] == pytest.approx(accuracy)
    assert [row["epoch"] for row in info["log"]] == [1, 2, 3]
    # the held rows were never trained on: their labels are not among the kept ones
    assert info["data"]["num_labelled"] == round(0.5 * (len(ts) - held.sum()))


def test_dvclive_files_hold_every_epoch_and_the_last_one_as_summary(tmp_path, train_cache):
    cfg = TrainStudentConfig(**SMALL)
    out = train_student.run(cfg, train_cache, "digits:train", tmp_path / "s")
    log = json.loads((out / "student.json").read_text())["log"]
    for key, metric in [("loss", "train/loss"), ("heldout_accuracy", "heldout/accuracy"),
                        ("heldout_loss", "heldout/loss"), ("lr", "lr")]:  # fmt: skip
        assert live_series(out, metric) == [(r["epoch"], pytest.approx(r[key])) for r in log]
    summary = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert summary["step"] == 3
    assert summary["heldout"]["accuracy"] == pytest.approx(log[-1]["heldout_accuracy"])
    assert not (tmp_path / "s.dvclive").exists()  # moved into the student when done


def test_holdout_zero_trains_on_every_row_and_says_so(tmp_path, runner, train_cache):
    out = tmp_path / "s"
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train", "--out", out,
        "--student", "mlp", "--model-kwargs", '{"hidden": [16]}', "--epochs", "2",
        "--holdout", "0", "--labeled-fraction", "0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "student.json").read_text())
    assert info["heldout_rows"] == 0 and "heldout_accuracy" not in info["final"]
    assert not (out / "dvclive" / "plots" / "metrics" / "heldout").exists()
    acc = info["final"]["train_accuracy"]
    assert f"train accuracy {acc:.3f} (no held-out rows)" in result.output


def test_summary_line_gives_loss_heldout_accuracy_and_time(tmp_path, runner, train_cache):
    out = tmp_path / "s"
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train", "--out", out,
        "--student", "mlp", "--model-kwargs", '{"hidden": [16]}', "--epochs", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "student.json").read_text())
    final = info["final"]
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"student written to {out} (epoch 2: loss {final['loss']:.4f}, ")
    assert f"held-out accuracy {final['heldout_accuracy']:.3f} (144 rows)" in line
    # Time and threads are facts of the run, in its run record beside the student, not in it.
    run = json.loads((tmp_path / "s.run.json").read_text())
    assert not {"train_seconds", "threads"} & set(info)
    assert run["command"] == "train-student" and run["threads"] == 1  # a 1 kFLOPs MLP
    assert f"{run['seconds']:.1f} s on 1 thread(s)" in line


@pytest.mark.parametrize("bad", ["1", "-0.1", "1.5", "nan"])
def test_holdout_out_of_range_is_one_line_naming_the_option(tmp_path, runner, train_cache, bad):
    from tests.test_cli_errors import assert_clean_error

    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train",
        "--out", tmp_path / "s", "--holdout", bad,
    )  # fmt: skip
    assert_clean_error(result, "--holdout")
    assert not (tmp_path / "s").exists()


def test_train_teacher_ends_with_the_same_kind_of_summary_line(tmp_path, runner):
    from pipeline.models.checkpoint import load_checkpoint

    out = tmp_path / "t.pt"
    result = invoke(
        runner, "train-teacher", "--data", "digits:train", "--model", "mlp",
        "--model-kwargs", '{"hidden": [8]}', "--epochs", "1", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    _, meta = load_checkpoint(out)
    final = meta["log"][-1]
    run = json.loads((tmp_path / "t.pt.run.json").read_text())
    assert "train_seconds" not in meta and run["threads"] == 1
    # The record names the artifact it is of: a record left beside another one is seen.
    assert run["of"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert run["machine"]["cpu_model"] and run["machine"]["cpu_capability"]
    line = result.output.strip().splitlines()[-1]
    assert line == (
        f"teacher written to {out} (epoch 1: loss {final['loss']:.4f}, "
        f"train accuracy {final['train_accuracy']:.3f}, {run['seconds']:.1f} s on 1 "
        "thread(s))"
    )
