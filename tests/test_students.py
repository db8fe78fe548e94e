"""Reading targets (in memory vs streamed), ensemble combination, the sweep, resume, and the
students' bad-input errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.cache.reader import TeacherCache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.core.training import Trainee
from pipeline.data import load_transfer_set
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from pipeline.student.targets import TargetBatch, open_targets, parse_size
from stages import precompute_logits, train_student
from tests.conftest import invoke, live_series
from tests.test_cli_errors import assert_clean_error

SMALL = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def member_cache(tmp_path_factory, teacher_ckpt, teacher_ckpt_mlp):
    """A two-teacher cache with members kept, in shards of 128 rows (12 shards)."""
    out = tmp_path_factory.mktemp("members") / "ens.zarr"
    cfg = PrecomputeConfig(keep_members=True, chunk_rows=64, chunks_per_shard=2)
    return precompute_logits.run(
        cfg, [str(teacher_ckpt), str(teacher_ckpt_mlp)], "digits:train", out
    )


@pytest.fixture(scope="module")
def member_cache_h5(tmp_path_factory, teacher_ckpt, teacher_ckpt_mlp):
    out = tmp_path_factory.mktemp("members_h5") / "ens.h5"
    cfg = PrecomputeConfig(keep_members=True, chunk_rows=64, chunks_per_shard=2)
    return precompute_logits.run(
        cfg, [str(teacher_ckpt), str(teacher_ckpt_mlp)], "digits:train", out
    )


def epoch_table(targets, epoch, batch_size=64, seed=0, method="mean-logits", T=1.0):
    """rows (N,) in epoch order, teacher logits (N, C) in the same order, batch sizes."""
    rows, logits, sizes = [], [], []
    for r, batch in targets.epoch(epoch, batch_size, seed):
        rows.append(r)
        logits.append(targets.teacher(batch, method, T).numpy())
        sizes.append(len(r))
    return np.concatenate(rows), np.concatenate(logits), sizes


@pytest.mark.parametrize("which", ["member_cache", "member_cache_h5"])
@pytest.mark.parametrize("method, T", [("mean-logits", 1.0), ("mean-probs", 3.0)])
def test_streaming_and_in_memory_give_the_same_epoch(request, which, method, T):
    cache = request.getfixturevalue(which)
    ts = load_transfer_set("digits:train")
    memory, _ = open_targets(cache, ts, combine=(method,))
    budget = "150KiB" if method == "mean-probs" else "60KiB"  # members take more room
    stream, _ = open_targets(cache, ts, combine=(method,), budget=budget)
    assert (memory.mode, stream.mode) == ("memory", "stream")
    assert stream.shard_rows == 128 and stream.buffer_rows < len(ts)  # really bounded
    for epoch in (0, 1):
        m_rows, m_logits, m_sizes = epoch_table(memory, epoch, method=method, T=T)
        s_rows, s_logits, s_sizes = epoch_table(stream, epoch, method=method, T=T)
        # Same rows, each exactly once, with the same targets; same batch sizes.
        n = len(ts)
        assert sorted(m_rows.tolist()) == sorted(s_rows.tolist()) == list(range(n))
        np.testing.assert_array_equal(m_logits[np.argsort(m_rows)], s_logits[np.argsort(s_rows)])
        assert m_sizes == s_sizes == [64] * (n // 64) + [n % 64]
        # Both shuffle: neither is the cache order, and the stream is not shard after shard.
        assert not (np.diff(s_rows[:128]) > 0).all() and not (np.diff(m_rows[:128]) > 0).all()
    # Another epoch, another order; the same epoch again, the same order.
    assert not np.array_equal(epoch_table(stream, 0)[0], epoch_table(stream, 1)[0])
    np.testing.assert_array_equal(epoch_table(stream, 1)[0], epoch_table(stream, 1)[0])


def test_targets_are_the_cached_logits_joined_by_sample_id(member_cache):
    ts = load_transfer_set("digits:train")
    # A subset of the transfer set, in another order: the join is by id, not by position.
    pick = np.random.default_rng(0).permutation(len(ts))[:300]
    ts.inputs, ts.labels, ts.sample_ids = ts.inputs[pick], ts.labels[pick], ts.sample_ids[pick]
    with open_cache(member_cache) as cache:
        stored = cache.logits()[:, 0]
        rows = cache.rows_for(ts.sample_ids)
    for mode in ("memory", "stream"):
        targets, _ = open_targets(member_cache, ts, cross_modal=True, mode=mode)
        assert targets.mode == mode
        got_rows, got, _ = epoch_table(targets, 0)
        np.testing.assert_array_equal(got, stored[rows[got_rows]])


def test_streaming_reads_whole_shards_never_rows(member_cache, monkeypatch):
    ts = load_transfer_set("digits:train")
    targets, _ = open_targets(member_cache, ts, combine=("mean-probs",), mode="stream")
    calls = []
    for name in ("logits", "member_logits"):
        original = getattr(TeacherCache, name)

        def spy(self, rows=slice(None), _name=name, _original=original):
            calls.append((_name, rows))
            return _original(self, rows)

        monkeypatch.setattr(TeacherCache, name, spy)
    list(targets.epoch(0, 64, 0))
    shards = -(-len(ts) // 128)
    assert len(calls) == 2 * shards  # one read of each array per shard
    assert all(isinstance(r, slice) and r.stop - r.start in (128, len(ts) % 128) for _, r in calls)


def test_mean_probs_averages_member_probabilities_at_the_students_temperature(member_cache):
    ts = load_transfer_set("digits:train")
    targets, _ = open_targets(member_cache, ts, combine=("mean-probs", "mean-logits"))
    with open_cache(member_cache) as cache:
        members = cache.member_logits()[:, :, 0]  # (M, N, C)
        stored = cache.logits()[:, 0]
    batch = TargetBatch(torch.from_numpy(stored[:50]), torch.from_numpy(members[:, :50]))
    for T in (1.0, 4.0):
        out = targets.teacher(batch, "mean-probs", T).double()
        z = members[:, :50].astype(np.float64) / T
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose((out / T).softmax(-1).numpy(), p.mean(0), rtol=1e-5)
    # mean-logits is what precompute stored.
    np.testing.assert_array_equal(targets.teacher(batch, "mean-logits", 4.0), stored[:50])


def test_a_student_trains_from_a_streamed_cache(tmp_path, member_cache):
    cfg = TrainStudentConfig(**SMALL, cache_memory="120KiB", combine="mean-probs", temperature=2)
    out = train_student.run(cfg, member_cache, "digits:train", tmp_path / "s")
    info = json.loads((out / "student.json").read_text())
    assert info["cache"]["read"] == "stream"
    assert info["config"]["combine"] == "mean-probs"


def same_weights(a, b):
    ma, _ = load_checkpoint(a / "student.pt")
    mb, _ = load_checkpoint(b / "student.pt")
    sa, sb = ma.state_dict(), mb.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_from_a_checkpoint_ends_as_an_uninterrupted_run(tmp_path, train_cache, monkeypatch):
    cfg = TrainStudentConfig(
        model="mlp",
        model_kwargs={"hidden": [16], "dropout": 0.3},
        epochs=3,
        optimizer="sgd",
        lr=0.05,
        schedule="step",
        milestones=[2],
    )
    straight = train_student.run(cfg, train_cache, "digits:train", tmp_path / "straight")

    save = Trainee.save

    def crash_after_epoch_two(self):
        save(self)
        if self.epochs_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainee, "save", crash_after_epoch_two)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_student.run(cfg, train_cache, "digits:train", out)
    assert not out.exists() and (tmp_path / "resumed.resume.pt").is_file()
    # epoch 2's checkpoint was written, then the run died before logging it
    assert [step for step, _ in live_series(tmp_path / "resumed.dvclive", "lr")] == [1]
    monkeypatch.setattr(Trainee, "save", save)

    changed = dataclasses.replace(cfg, lr=0.1)
    with pytest.raises(PipelineError, match=r"other settings \(lr: 0.05, now 0.1\); delete it"):
        train_student.run(changed, train_cache, "digits:train", out, resume=True)

    train_student.run(cfg, train_cache, "digits:train", out, resume=True)
    assert same_weights(straight, out)
    assert not (tmp_path / "resumed.resume.pt").exists()
    lrs = live_series(out, "lr")  # the resumed run's DVCLive log holds every epoch once
    assert [step for step, _ in lrs] == [1, 2, 3]
    assert [lr for _, lr in lrs] == pytest.approx([0.05, 0.05, 0.005])  # x0.1 after 2 epochs
    assert live_series(out, "train/loss") == live_series(straight, "train/loss")
    assert live_series(out, "heldout/accuracy") == live_series(straight, "heldout/accuracy")
    assert not (tmp_path / "resumed.dvclive").exists()


def write_params(tmp_path, sweep):
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "train_student": {"epochs": 2, "labeled_fraction": 0.5},
                "students": {
                    "tiny": {"model": "mlp", "model_kwargs": {"hidden": [16], "dropout": 0.2}}
                },
                "losses": {"kd": {"alpha": 0.5}, "dkd": {}, "ce": {"epochs": 3}},
                "sweep": sweep,
            }
        )
    )
    return params


def test_sweep_trains_every_student_as_train_student_would(tmp_path, runner, train_cache):
    params = write_params(
        tmp_path, {"students": ["tiny"], "losses": ["kd", "dkd"], "temperatures": [2, 4]}
    )
    result = invoke(
        runner,
        "train-students",
        "--params",
        params,
        "--cache",
        train_cache,
        "--data",
        "digits:train",
        "--out-dir",
        tmp_path / "sweep",
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert names == ["tiny-ce", "tiny-dkd-t2", "tiny-dkd-t4", "tiny-kd-t2", "tiny-kd-t4"]
    records = sorted(p.name for p in (tmp_path / "sweep").glob("*.run.json"))
    assert records == [f"{n}.run.json" for n in names]  # each student's run record beside it
    info = json.loads((tmp_path / "sweep/tiny-kd-t4/student.json").read_text())
    assert info["preset"] == "tiny" and info["loss_settings"] == {"alpha": 0.5}
    assert info["config"]["temperature"] == 4.0
    ce = json.loads((tmp_path / "sweep/tiny-ce/student.json").read_text())
    assert ce["config"]["epochs"] == 3  # losses.ce overlays the shared section

    # Lockstep training beside four others gives the weights a lone run gives (dropout too).
    for name, loss, t in (("tiny-kd-t4", "kd", "4"), ("tiny-ce", "ce", "1")):
        solo = tmp_path / f"solo-{name}"
        result = invoke(
            runner,
            "train-student",
            "--params",
            params,
            "--name",
            "tiny",
            "--loss",
            loss,
            "--temperature",
            t,
            "--cache",
            train_cache,
            "--data",
            "digits:train",
            "--out",
            solo,
        )
        assert result.exit_code == 0, result.output
        assert same_weights(tmp_path / "sweep" / name, solo), name

    # --resume skips finished students; without it, existing outputs are refused.
    again = [
        "train-students",
        "--params",
        params,
        "--cache",
        train_cache,
        "--data",
        "digits:train",
        "--out-dir",
        tmp_path / "sweep",
    ]
    resumed = invoke(runner, *again, "--resume")
    assert resumed.exit_code == 0, resumed.output
    skipped = [f"student already done, skipped: {tmp_path / 'sweep' / n}" for n in names]
    assert sorted(resumed.output.splitlines()) == skipped  # no time: nothing was trained
    assert_clean_error(
        invoke(runner, *again),
        "already exists (5 of 5 students are done): --resume skips finished students and "
        "continues the others, --overwrite retrains them all",
    )


def test_sweep_command_line_lists_override_the_sweep_section(tmp_path, runner, train_cache):
    params = write_params(tmp_path, {"students": ["tiny"], "losses": ["kd"], "temperatures": [2]})
    result = invoke(
        runner,
        "train-students",
        "--params",
        params,
        "--cache",
        train_cache,
        "--data",
        "digits:train",
        "--out-dir",
        tmp_path / "s",
        "--students",
        "tiny,mlp",
        "--losses",
        "soft",
        "--temperatures",
        "1.5",
        "--no-baseline",
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert written == ["mlp-soft-t1.5", "tiny-soft-t1.5"]
    result = invoke(
        runner,
        "train-students",
        "--params",
        params,
        "--cache",
        train_cache,
        "--data",
        "digits:train",
        "--out-dir",
        tmp_path / "s2",
        "--students",
        "nosuch",
    )
    assert_clean_error(result, "--students nosuch: neither a key of `students`", "resnet20")


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(4096) == 4096
    for bad in ("lots", "-1GiB", "0", "12 parsecs"):
        with pytest.raises(PipelineError, match="--cache-memory"):
            parse_size(bad)


FAST = ["--epochs", "1", "--student", "mlp", "--model-kwargs", '{"hidden": [8]}']


def train(runner, tmp_path, cache, *args):
    return invoke(
        runner,
        "train-student",
        "--cache",
        cache,
        "--data",
        "digits:train",
        "--out",
        tmp_path / "s",
        *FAST,
        *args,
    )


def test_bad_input_is_one_clear_line(tmp_path, runner, train_cache, member_cache, monkeypatch):
    assert_clean_error(
        train(runner, tmp_path, train_cache, "--loss", "hinton"),
        "unknown loss 'hinton'",
        "dist, dkd, kd, mse, soft",
    )
    assert_clean_error(
        train(runner, tmp_path, train_cache, "--student", "resnet1000"),
        "unknown model 'resnet1000'",
        "resnet20",
        "wrn_16_2",
    )
    assert_clean_error(
        train(runner, tmp_path, train_cache, "--combine", "mean-probs"),
        "--combine mean-probs needs per-member logits",
        "--keep-members",
    )
    assert_clean_error(
        train(runner, tmp_path, member_cache, "--cache-memory", "8KiB"),
        "--cache-memory 8.0 KiB is too small for one shard",
        "128 rows",
    )
    assert_clean_error(
        train(runner, tmp_path, train_cache, "--cache-memory", "huge"), "--cache-memory 'huge'"
    )
    assert_clean_error(
        train(runner, tmp_path, train_cache, "--schedule", "step", "--milestones", "5"),
        "--milestones [5]",
    )

    from torch import nn

    from pipeline import models

    monkeypatch.setitem(
        models._MODELS,
        "five_way",
        lambda num_classes, input_shape: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)),
    )
    assert_clean_error(
        train(runner, tmp_path, train_cache, "--student", "five_way", "--model-kwargs", "{}"),
        "student five_way outputs 5 classes, but the cache has 10 classes",
    )
    assert not (tmp_path / "s").exists()


def test_resume_without_a_checkpoint_says_it_starts_from_epoch_1(tmp_path, runner, train_cache):
    out = tmp_path / "s"
    result = invoke(
        runner, "train-student", "--cache", train_cache, "--data", "digits:train", "--out", out,
        "--student", "mlp", "--model-kwargs", '{"hidden": [8]}', "--epochs", "1", "--resume",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"note: --resume: no {out}.resume.pt, so {out} trains from epoch 1" in result.output
    assert (out / "student.pt").is_file()


def test_resume_refuses_a_finished_student_of_other_settings(tmp_path, runner, train_cache):
    """train-students --resume skips finished students only when they were trained with
    the settings asked for now; otherwise it says which differ."""
    args = [
        "train-students", "--cache", train_cache, "--data", "digits:train", "--out-dir",
        tmp_path / "sweep", "--students", "mlp", "--losses", "kd", "--temperatures", "2",
        "--no-baseline", "--epochs", "1",
    ]  # fmt: skip
    assert invoke(runner, *args).exit_code == 0
    assert invoke(runner, *args, "--resume").exit_code == 0  # the same settings: skipped
    result = invoke(runner, *args[:-1], "2", "--resume")
    assert_clean_error(result, "was trained with other settings (epochs 1 (now 2))")
