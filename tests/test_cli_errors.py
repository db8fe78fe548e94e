"""Bad input at the CLI: one clear line naming the thing, non-zero exit, no traceback."""

import shutil

import pytest
import torch

from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint
from tests.conftest import invoke


def assert_clean_error(result, *fragments):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], result.output


def test_missing_teacher_checkpoint(tmp_path, runner):
    result = invoke(
        runner,
        "precompute-logits",
        "--teacher",
        tmp_path / "gone.pt",
        "--data",
        "digits:test",
        "--out",
        tmp_path / "c.zarr",
    )
    assert_clean_error(result, "checkpoint not found", "gone.pt")
    assert not (tmp_path / "c.zarr").exists()


def test_unreadable_teacher_checkpoint(tmp_path, runner):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = invoke(
        runner,
        "precompute-logits",
        "--teacher",
        bad,
        "--data",
        "digits:test",
        "--out",
        tmp_path / "c.zarr",
    )
    assert_clean_error(result, "bad.pt")


def test_ensemble_members_with_different_class_counts(tmp_path, runner, teacher_ckpt):
    torch.manual_seed(0)
    five = tmp_path / "five.pt"
    save_checkpoint(
        five,
        create_model("mlp", 5, (1, 8, 8)),
        {
            "model": "mlp",
            "model_kwargs": {},
            "num_classes": 5,
            "input_shape": [1, 8, 8],
            "class_names": None,
        },
    )
    result = invoke(
        runner,
        "precompute-logits",
        "--teacher",
        teacher_ckpt,
        "--teacher",
        five,
        "--data",
        "digits:test",
        "--out",
        tmp_path / "c.zarr",
    )
    assert_clean_error(result, "five.pt has 5 classes", "has 10", "must agree")
    assert not (tmp_path / "c.zarr").exists()


def test_teacher_input_shape_mismatch(tmp_path, runner):
    torch.manual_seed(0)
    wide = tmp_path / "wide.pt"
    save_checkpoint(
        wide,
        create_model("mlp", 10, (3, 32, 32)),
        {
            "model": "mlp",
            "model_kwargs": {},
            "num_classes": 10,
            "input_shape": [3, 32, 32],
        },
    )
    result = invoke(
        runner,
        "precompute-logits",
        "--teacher",
        wide,
        "--data",
        "digits:test",
        "--out",
        tmp_path / "c.zarr",
    )
    assert_clean_error(result, "expects inputs of shape (3, 32, 32)", "(1, 8, 8)")


@pytest.mark.parametrize(
    "yaml_text, fragments",
    [
        ("train_teacher:\n  epoch: 3\n", ["train_teacher: unknown key 'epoch'"]),
        ("train_teacher:\n  epochs: three\n", ["train_teacher.epochs: expected int", "'three'"]),
        ("train_teacher: [1, 2]\n", ["section 'train_teacher' must be a mapping"]),
        (  # a syntax error names the line and column where the parser gave up
            "train_teacher:\n  lr: [1, 2\n  epochs: 3\n",
            ["not valid YAML (line 3, column 9: expected ',' or ']', but got ':'"],
        ),
    ],
)
def test_bad_params_yaml(tmp_path, runner, yaml_text, fragments):
    params = tmp_path / "params.yaml"
    params.write_text(yaml_text)
    result = invoke(
        runner,
        "train-teacher",
        "--params",
        params,
        "--data",
        "digits:train",
        "--out",
        tmp_path / "t.pt",
    )
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "t.pt").exists()


def test_unknown_student_preset(tmp_path, runner, train_cache):
    params = tmp_path / "params.yaml"
    params.write_text("students:\n  kd_t4: {loss: kd}\n")
    result = invoke(
        runner,
        "train-student",
        "--params",
        params,
        "--name",
        "kd_t9",
        "--cache",
        train_cache,
        "--data",
        "digits:train",
        "--out",
        tmp_path / "s",
    )
    assert_clean_error(result, "--name kd_t9: no students.kd_t9", "kd_t4")


def test_existing_teacher_output_needs_overwrite(tmp_path, runner):
    out = tmp_path / "t.pt"
    out.write_bytes(b"precious")
    result = invoke(
        runner, "train-teacher", "--data", "digits:train", "--out", out, "--epochs", "1"
    )
    assert_clean_error(result, "already exists (pass --overwrite")
    assert out.read_bytes() == b"precious"


def test_missing_cache(tmp_path, runner):
    result = invoke(runner, "inspect", tmp_path / "none.zarr")
    assert_clean_error(result, "cache not found", "none.zarr")
    assert "is there" not in result.output


def test_missing_cache_names_the_one_of_the_other_format_beside_it(tmp_path, runner, test_cache):
    shutil.copy(test_cache, tmp_path / "test.h5")
    result = invoke(runner, "inspect", tmp_path / "test.zarr")
    assert_clean_error(
        result, f"cache not found: {tmp_path / 'test.zarr'} (but {tmp_path / 'test.h5'} is there)"
    )


@pytest.mark.parametrize(
    "out, fmt, named", [("c.h5", "zarr", "an HDF5"), ("c.zarr", "hdf5", "a Zarr")]
)
def test_a_cache_suffix_that_contradicts_the_format_is_refused(
    tmp_path, runner, teacher_ckpt, out, fmt, named
):
    result = invoke(
        runner, "precompute-logits", "--teacher", teacher_ckpt, "--data", "digits:test",
        "--out", tmp_path / out, "--format", fmt,
    )  # fmt: skip
    where = tmp_path / out
    assert_clean_error(result, f"{where} is named as {named} cache but --format is {fmt}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command, made, kept",
    [
        ("train-teacher", None, "nothing was written; run the same command again"),
        ("precompute-logits", "c.zarr.partial", "the finished shards are kept in c.zarr.partial"),
        ("precompute-logits", None, "nothing was finished yet (no c.zarr.partial); run the same"),
        ("train-student", "s.resume.pt", "kept in s.resume.pt; run the same command with --resume"),
        ("train-student", None, "nothing was finished yet (no s.resume.pt)"),
    ],
)
def test_ctrl_c_says_what_that_command_kept(runner, monkeypatch, tmp_path, command, made, kept):
    """The message after Ctrl-C is each command's own truth: train-teacher keeps nothing, and
    a run stopped before its first shard or epoch has nothing to resume from."""
    from stages import precompute_logits, train_student, train_teacher

    monkeypatch.chdir(tmp_path)
    if made:
        (tmp_path / made).mkdir()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    for stage in (precompute_logits, train_student, train_teacher):
        monkeypatch.setattr(stage, "run", interrupt)
    args = {
        "train-teacher": ["--data", "digits:train", "--out", "t.pt"],
        "precompute-logits": ["--teacher", "t.pt", "--data", "digits:train", "--out", "c.zarr"],
        "train-student": ["--cache", "c.zarr", "--data", "digits:train", "--out", "s"],
    }[command]
    result = invoke(runner, command, *args)
    assert result.exit_code == 130
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and kept in last, result.output


def test_inspect_shows_teacher_and_fingerprint(runner, train_cache):
    result = invoke(runner, "inspect", train_cache)
    assert result.exit_code == 0
    assert "complete" in result.output and "True" in result.output
    assert "(1437, 1, 10) float32" in result.output
    assert "digits:train (fingerprint" in result.output


def test_a_reader_that_closes_the_pipe_ends_quietly(runner, monkeypatch):
    """`pipeline models | head -1`: the closed pipe is the reader's choice, not an error."""
    import click

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(click, "echo", closed)
    result = invoke(runner, "models")
    assert result.exit_code == 141
    assert "unexpected error" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (
            ["train-student", "--bogus"],
            ["No such option '--bogus'", "train-student --help'"],
        ),
        (["train-student", "--epochs", "x"], ["'--epochs': 'x' is not a valid integer"]),
        (["precompute-logits", "--teacher", "t.pt"], ["Missing option '--data'"]),
        (["nosuch"], ["No such command 'nosuch'", "See '"]),
    ],
)
def test_a_usage_error_is_one_line_naming_the_commands_help(runner, args, fragments):
    result = invoke(runner, *args)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0, result.output  # click's own is 4 lines
    assert_clean_error(result, *fragments)
