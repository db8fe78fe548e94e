"""Property: whatever a params.yaml and the command line say, train-student either writes a
student whose every weight is finite, or fails with one clean line: never a traceback."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.models.checkpoint import load_checkpoint
from tests.conftest import invoke

pytestmark = pytest.mark.slow

NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, 1e-9, 1e9, -1e-3, 2**63, 2**64]),
)
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2))
PLAUSIBLE = st.floats(0.0, 1.0)  # weighted in, so that a good share of examples train
ANY = st.one_of(PLAUSIBLE, PLAUSIBLE, NUMBERS, JUNK)

# Values that keep a successful run tiny: at most 2 epochs on a small MLP.
TRAINING = {
    "epochs": st.one_of(st.integers(-1, 2), JUNK),
    "batch_size": st.one_of(st.integers(-1, 4096), JUNK),
    "lr": ANY,
    "weight_decay": ANY,
    "momentum": ANY,
    "optimizer": st.sampled_from(["adamw", "sgd", "adam", 3]),
    "schedule": st.sampled_from(["cosine", "step", "constant", "linear"]),
    "milestones": st.one_of(st.lists(st.integers(-1, 3), max_size=2), JUNK),
    "lr_decay": ANY,
    "temperature": ANY,
    "labeled_fraction": ANY,
    "threads": st.one_of(st.integers(-1, 2), JUNK),
    "seed": st.one_of(st.integers(-1, 2**65), JUNK),
    "loss": st.sampled_from(["kd", "soft", "mse", "dkd", "dist", "ce", "nope"]),
    "cache_memory": st.sampled_from(["1KiB", "2GiB", "0", "-5", "lots", 100000]),
    "combine": st.sampled_from(["mean-logits", "mean-probs", "median"]),
    "bogus_key": ANY,
}
SETTINGS = {"alpha": ANY, "beta": ANY, "gamma": ANY, "tau": ANY}


def _subset(draw, table: dict) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(table)), unique=True, max_size=4))
    return {k: draw(table[k]) for k in keys}


@st.composite
def params_files(draw) -> dict:
    shared = {"epochs": 1, "model_kwargs": {"hidden": [8]}, **_subset(draw, TRAINING)}
    loss = shared.get("loss", "kd") if isinstance(shared.get("loss"), str) else "kd"
    return {"train_student": shared, "losses": {loss: _subset(draw, SETTINGS)}}


@st.composite
def options(draw) -> list[str]:
    values = st.one_of(PLAUSIBLE, PLAUSIBLE, NUMBERS, st.sampled_from(["x", ""]))
    chosen = _subset(draw, {"lr": values, "temperature": values, "alpha": values, "epochs": values})
    args = []
    for key, value in chosen.items():
        if key == "epochs" and isinstance(value, int) and value > 2:
            value = 2
        args += [f"--{key}", str(value)]
    return args


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(params=params_files(), args=options())
def test_train_student_succeeds_or_fails_cleanly(tmp_path, runner, train_cache, params, args):
    work = tmp_path / "w"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    out = work / "student"
    result = invoke(
        runner, "train-student", "--params", work / "params.yaml", "--cache", train_cache,
        "--data", "digits:train", "--out", out, *args,
    )  # fmt: skip
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        model, _ = load_checkpoint(out / "student.pt")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    else:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
        assert not out.exists()


def test_the_fuzz_reaches_both_outcomes(tmp_path, runner, train_cache):
    """A sanity anchor for the property: a valid file trains, a nan setting fails."""
    good = {"train_student": {"epochs": 1, "model_kwargs": {"hidden": [8]}}}
    bad = {"train_student": {"epochs": 1}, "losses": {"kd": {"alpha": math.nan}}}
    for name, params, code in (("good", good, 0), ("bad", bad, 1)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(params))
        result = invoke(
            runner, "train-student", "--params", tmp_path / f"{name}.yaml", "--cache",
            train_cache, "--data", "digits:train", "--out", tmp_path / name,
        )  # fmt: skip
        assert result.exit_code == code, result.output
