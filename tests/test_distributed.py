"""Students under torchrun (2 CPU ranks, gloo): DDP training equals one process, a killed run
resumes under any number of ranks, and train-students spreads whole students over ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.distributed import Ranks, spread_students
from pipeline.core.training import KILL_AFTER_EPOCH_ENV, Trainee
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import TrainStudentConfig
from stages import train_student
from tests import procs
from tests.conftest import invoke, live_series
from tests.test_cli_errors import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]
DATA = "digits:train"
ARGS = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 2, "batch_size": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, kill: str | None = None) -> subprocess.CompletedProcess:
    """`pipeline ARGS` under torchrun with 2 CPU ranks; `kill`: KILL_AFTER_EPOCH_ENV
    ("EPOCH:RANK"). A hung rank fails the test at the timeout, and is killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(KILL_AFTER_EPOCH_ENV, None)
    if kill is not None:
        env[KILL_AFTER_EPOCH_ENV] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "-m", "pipeline", *map(str, args)]
    return procs.run(cmd, env=env)


def student_args(cache: Path, out: Path, loss: str) -> list:
    """train-student with ARGS (and every row labelled) on the command line."""
    return [
        "train-student", "--cache", cache, "--data", DATA, "--out", out, "--student", "mlp",
        "--model-kwargs", '{"hidden": [16]}', "--epochs", "2", "--loss", loss,
        "--labeled-fraction", "1",
    ]  # fmt: skip


def assert_close(a: Path, b: Path) -> None:
    """The students at `a` and `b` have the same weights within float tolerance."""
    sa = load_checkpoint(a / "student.pt")[0].state_dict()
    sb = load_checkpoint(b / "student.pt")[0].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0), (a.name, b.name, k)


def same_weights(a: Path, b: Path) -> bool:
    sa = load_checkpoint(a / "student.pt")[0].state_dict()
    sb = load_checkpoint(b / "student.pt")[0].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, train_cache):
    """straight(loss, ranks): the directory of an uninterrupted run (1 process or 2 ranks),
    made once per module."""
    made: dict[tuple[str, int], Path] = {}

    def get(loss: str, ranks: int) -> Path:
        if (loss, ranks) not in made:
            out = tmp_path_factory.mktemp("straight") / f"{loss}-{ranks}"
            if ranks == 1:
                cfg = TrainStudentConfig(**ARGS, loss=loss, labeled_fraction=1.0)
                train_student.run(cfg, train_cache, DATA, out)
            else:
                result = launch(*student_args(train_cache, out, loss))
                assert result.returncode == 0, result.stderr[-3000:]
                assert result.stdout.count("student written to") == 1  # rank 0 speaks
            made[loss, ranks] = out
        return made[loss, ranks]

    return get


def test_each_rank_takes_a_contiguous_near_equal_share_of_a_batch():
    for n in (0, 1, 7, 64, 65):
        for world in (1, 2, 3):
            parts = [Ranks(r, world).share(n) for r in range(world)]
            sizes = [p.stop - p.start for p in parts]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]


def test_spread_students_deals_them_out_round_robin():
    assert [spread_students(list(range(7)), Ranks(r, 2)) for r in (0, 1)] == [
        [0, 2, 4, 6],
        [1, 3, 5],
    ]
    assert spread_students([0, 1], Ranks(2, 3)) == []  # more ranks than students
    assert spread_students([0, 1, 2], Ranks()) == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kd", "ce"])
def test_two_rank_ddp_training_equals_one_process(loss, straight):
    """The same global batch of 64 split over 2 ranks (uneven last batch included) ends
    with the single process's weights; rank 0 alone writes and speaks."""
    ddp, single = straight(loss, 2), straight(loss, 1)
    assert_close(ddp, single)
    log_a = json.loads((ddp / "student.json").read_text())["log"]
    log_b = json.loads((single / "student.json").read_text())["log"]
    for row_a, row_b in zip(log_a, log_b, strict=True):  # every rank's rows counted
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)
        # DDP forwards other batch shapes and sums in another order: weights equal within
        # rounding (assert_close), so a held-out row at a near-tie may flip.
        heldout_rows = json.loads((single / "student.json").read_text())["heldout_rows"]
        diff = abs(row_a["heldout_accuracy"] - row_b["heldout_accuracy"])
        assert diff <= 1 / heldout_rows + 1e-12
    assert not ddp.with_name(ddp.name + ".resume.pt").exists()


def epochs_done(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["epochs_done"])


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_under_two_ranks_or_in_one_process(
    tmp_path, train_cache, straight
):
    """Rank 1 is killed (-9) after epoch 1 of 2: torchrun stops rank 0, and the checkpoint
    rank 0 wrote continues under 2 ranks, or in one process, to the uninterrupted weights."""
    out = tmp_path / "s"
    killed = launch(*student_args(train_cache, out, "kd"), kill="1:1")
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    checkpoint = tmp_path / "s.resume.pt"
    assert not out.exists() and epochs_done(checkpoint) == 1
    alone = tmp_path / "alone"
    shutil.copy(checkpoint, tmp_path / "alone.resume.pt")  # the same checkpoint, one process
    cfg = TrainStudentConfig(**ARGS, loss="kd", labeled_fraction=1.0)
    train_student.run(cfg, train_cache, DATA, alone, resume=True)

    resumed = launch(*student_args(train_cache, out, "kd"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not checkpoint.exists()
    assert [step for step, _ in live_series(out, "train/loss")] == [1, 2]
    for run in (out, alone):
        assert_close(run, straight("kd", 2))
        assert_close(run, straight("kd", 1))


@pytest.mark.slow
def test_a_killed_single_process_run_resumes_under_two_ranks(
    tmp_path, train_cache, straight, monkeypatch
):
    """One process interrupted after epoch 1 of 2 (in this process: cheaper than a kill -9,
    and the same checkpoint) continues under 2 ranks to the uninterrupted weights."""
    save = Trainee.save

    def interrupt_after_epoch_one(self):
        save(self)
        if self.epochs_done == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainee, "save", interrupt_after_epoch_one)
    out = tmp_path / "s"
    cfg = TrainStudentConfig(**ARGS, loss="kd", labeled_fraction=1.0)
    with pytest.raises(KeyboardInterrupt):
        train_student.run(cfg, train_cache, DATA, out)
    checkpoint = tmp_path / "s.resume.pt"
    assert not out.exists() and epochs_done(checkpoint) == 1
    resumed = launch(*student_args(train_cache, out, "kd"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not checkpoint.exists()
    assert_close(out, straight("kd", 2))
    assert_close(out, straight("kd", 1))


def write_params(tmp_path: Path, spread: str) -> Path:
    """Three tiny students with dropout (tiny-kd-t2, tiny-kd-t4, tiny-ce)."""
    params = tmp_path / "params.yaml"
    values = {
        "train_student": {"epochs": 2, "labeled_fraction": 0.5},
        "students": {"tiny": {"model": "mlp", "model_kwargs": {"hidden": [16], "dropout": 0.2}}},
        "losses": {"kd": {"alpha": 0.5}, "ce": {"epochs": 3}},
        "sweep": {"students": ["tiny"], "losses": ["kd"], "temperatures": [2, 4], "spread": spread},
    }
    params.write_text(json.dumps(values))
    return params


@pytest.mark.slow
def test_spread_students_trains_each_as_one_process_alone(tmp_path, runner, train_cache):
    """Rank 0 trains tiny-kd-t2 and tiny-ce, rank 1 tiny-kd-t4, each as a plain process:
    byte-identical to the same student trained alone (dropout too), written by its rank."""
    params, sweep = write_params(tmp_path, "students"), tmp_path / "sweep"
    args = ["--params", params, "--cache", train_cache, "--data", DATA]
    result = launch("train-students", *args, "--out-dir", sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["tiny-ce", "tiny-kd-t2", "tiny-kd-t4"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == names
    for name in names:
        assert result.stdout.count(f"student written to {sweep / name} ") == 1
    solo_runs = {"tiny-kd-t2": ("kd", "2"), "tiny-kd-t4": ("kd", "4"), "tiny-ce": ("ce", "1")}
    for name, (loss, t) in solo_runs.items():
        solo = tmp_path / f"solo-{name}"
        options = ["--name", "tiny", "--loss", loss, "--temperature", t, "--out", solo]
        assert invoke(runner, "train-student", *args, *options).exit_code == 0
        assert same_weights(sweep / name, solo), name
    assert not list(tmp_path.glob("sweep/*.lock")) and not list(sweep.glob("*.resume.pt"))


def test_spread_is_checked_like_every_other_key(tmp_path, runner, train_cache):
    args = ["--cache", train_cache, "--data", DATA, "--out-dir", tmp_path / "sweep"]
    result = invoke(runner, "train-students", "--params", write_params(tmp_path, "rows"), *args)
    assert_clean_error(result, "params.yaml:sweep.spread 'rows'", "students, batches")
    result = invoke(runner, "train-students", "--spread", "rows", *args)
    assert result.exit_code != 0 and "--spread" in result.output
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_token_cache_and_its_student_under_two_ranks_equal_one_process(tmp_path, runner):
    from tests.cache.helpers import zarr_files

    lm_data = "pystdlib:train?limit=48&length=32"
    teacher, cache = tmp_path / "t.pt", tmp_path / "c.zarr"
    assert invoke(runner, "train-teacher", "--data", lm_data, "--model", "gpt_nano",
                  "--epochs", "1", "--out", teacher).exit_code == 0  # fmt: skip
    pre = ["precompute-logits", "--teacher", teacher, "--data", lm_data, "--topk", "8",
           "--chunk-rows", "128", "--chunks-per-shard", "2"]  # fmt: skip
    assert invoke(runner, *pre, "--out", cache).exit_code == 0
    shared = launch(*pre, "--out", tmp_path / "c2.zarr")  # each rank computes its shards
    assert shared.returncode == 0, shared.stderr
    assert zarr_files(tmp_path / "c2.zarr") == zarr_files(cache)  # the same bytes
    args = ["train-student", "--cache", cache, "--data", lm_data, "--student", "gpt_nano",
            "--loss", "kl", "--epochs", "2", "--batch-size", "15"]  # fmt: skip
    two = launch(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert invoke(runner, *args, "--out", tmp_path / "one").exit_code == 0
    one = load_checkpoint(tmp_path / "one" / "student.pt")[0].state_dict()
    two = load_checkpoint(tmp_path / "two" / "student.pt")[0].state_dict()
    # Adam divides by the gradient's running scale, so float-order differences in the ranks'
    # all-reduce grow to about 1e-6 over 8 steps: within 1e-5.
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=0) for k in one)
    assert json.loads((tmp_path / "two.run.json").read_text())["ranks"] == 2
    one_log = load_checkpoint(tmp_path / "one" / "student.pt")[1]["log"]
    two_log = load_checkpoint(tmp_path / "two" / "student.pt")[1]["log"]
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5)
