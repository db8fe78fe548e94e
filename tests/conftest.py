"""Shared fixtures: tiny seeded teachers and caches on the built-in digits data."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.core.config import PrecomputeConfig, TrainTeacherConfig


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """At the end of the session, no process started through `tests.procs.run` is alive
    (each call kills what it started; this catches one that escaped)."""
    from tests import procs

    yield
    left = procs.leftovers()
    procs.kill_tagged(procs.SESSION)
    assert not left, f"test processes outlived the tests (killed now): {left}"


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A small CNN teacher, briefly trained on digits:train (seeded)."""
    from stages import train_teacher

    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    cfg = TrainTeacherConfig(
        model="cnn", model_kwargs={"channels": [8, 16], "hidden": 32}, epochs=3, seed=0
    )
    return train_teacher.run(cfg, "digits:train", out)


@pytest.fixture(scope="session")
def teacher_ckpt_mlp(tmp_path_factory) -> Path:
    """A second, different teacher (an MLP) for ensembles."""
    from stages import train_teacher

    out = tmp_path_factory.mktemp("teacher_mlp") / "teacher.pt"
    cfg = TrainTeacherConfig(model="mlp", model_kwargs={"hidden": [32]}, epochs=3, seed=1)
    return train_teacher.run(cfg, "digits:train", out)


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, teacher_ckpt) -> Path:
    """A complete Zarr cache of `teacher_ckpt` on digits:train."""
    from stages import precompute_logits

    out = tmp_path_factory.mktemp("caches") / "train.zarr"
    return precompute_logits.run(PrecomputeConfig(), [str(teacher_ckpt)], "digits:train", out)


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory, teacher_ckpt) -> Path:
    """A complete HDF5 cache of `teacher_ckpt` on digits:test."""
    from stages import precompute_logits

    out = tmp_path_factory.mktemp("caches") / "test.h5"
    return precompute_logits.run(PrecomputeConfig(), [str(teacher_ckpt)], "digits:test", out)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    """Run the CLI in-process; returns click's Result."""
    from pipeline.cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def live_series(path: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) rows of a DVCLive metric, e.g. "heldout/accuracy", of a student directory
    or of a DVCLive directory itself."""
    live = Path(path) if (Path(path) / "plots").is_dir() else Path(path) / "dvclive"
    lines = (live / "plots" / "metrics" / f"{metric}.tsv").read_text()
    rows = [line.split("\t") for line in lines.splitlines()[1:]]
    return [(int(r[0]), float(r[-1])) for r in rows]
