"""Students under torchrun: 2 CPU ranks (gloo) train what one process trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import Ranks
from pipeline.students import TrainStudentConfig
from stages import train_student

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"model": "mlp", "model_kwargs": {"hidden": [16]}, "epochs": 2, "batch_size": 64}


def test_each_rank_takes_a_contiguous_near_equal_share_of_a_batch():
    for n in (0, 1, 7, 64, 65):
        for world in (1, 2, 3):
            parts = [Ranks(r, world).share(n) for r in range(world)]
            sizes = [p.stop - p.start for p in parts]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kd", "ce"])
def test_two_rank_ddp_training_equals_one_process(tmp_path, train_cache, loss):
    """The same global batch of 64 split over 2 ranks (uneven last batch included) ends
    with the single process's weights; rank 0 alone writes and speaks."""
    cfg = TrainStudentConfig(**ARGS, loss=loss, labeled_fraction=1.0)
    single = train_student.run(cfg, train_cache, "digits:train", tmp_path / "single")
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "pipeline", "train-student", "--cache", str(train_cache), "--data",
        "digits:train", "--out", str(out), "--student", "mlp", "--model-kwargs",
        '{"hidden": [16]}', "--epochs", "2", "--loss", loss, "--labeled-fraction", "1",
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student written to") == 1
    a, _ = load_checkpoint(out / "student.pt")
    b, _ = load_checkpoint(single / "student.pt")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), name
    log_a = json.loads((out / "student.json").read_text())["log"]
    log_b = json.loads((single / "student.json").read_text())["log"]
    for row_a, row_b in zip(log_a, log_b, strict=True):  # every rank's rows counted
        assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-5)
        assert row_a["heldout_accuracy"] == row_b["heldout_accuracy"]
    assert not (tmp_path / "ddp.resume.pt").exists()
