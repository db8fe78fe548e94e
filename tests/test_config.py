"""Config layering and validation: defaults → params.yaml section → explicit options."""

import pytest

from pipeline.core.config import load_params, resolve, section
from pipeline.core.errors import PipelineError
from pipeline.student.students import TrainStudentConfig


def test_layers_override_in_order():
    cfg = resolve(
        TrainStudentConfig,
        ("params.yaml:train_student", {"temperature": 2, "epochs": 5}),
        ("params.yaml:students.x", {"temperature": 8.0}),
        ("command line", {"epochs": 7}),
    )
    assert cfg.temperature == 8.0 and isinstance(cfg.temperature, float)
    assert cfg.epochs == 7
    assert cfg.lr == TrainStudentConfig().lr  # untouched default


def test_unknown_key_names_the_key_and_section():
    with pytest.raises(PipelineError, match=r"params.yaml:train_student: unknown key 'temprature'"):
        resolve(TrainStudentConfig, ("params.yaml:train_student", {"temprature": 4}))


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", "ten"),
        ("epochs", 2.5),
        ("epochs", True),
        ("temperature", "hot"),
        ("model_kwargs", [1]),
        ("model", 3),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(PipelineError, match=rf"train_student\.{key}: expected"):
        resolve(TrainStudentConfig, ("params.yaml:train_student", {key: value}))


def test_load_params_errors(tmp_path):
    with pytest.raises(PipelineError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(PipelineError, match="mapping of sections"):
        load_params(lst)
    with pytest.raises(PipelineError, match="section 'x' must be a mapping"):
        section({"x": [1]}, "x")
    assert section({}, "missing") == {}


CHECKED_BY_CHECK_PARAMS = [
    ("precompute_logits", "dtype", "float64", "expected one of float32, float16, bfloat16"),
    ("precompute_logits", "compression", "zstd:99", "zstd:LEVEL (1-22)"),
    ("precompute_logits", "combine", "max", "expected one of mean-logits, mean-probs"),
    ("precompute_logits", "augment", "blur", "unknown augmentation 'blur'"),
    ("precompute_logits", "format", "npy", "expected auto, zarr or hdf5"),
    ("precompute_logits", "sample_values", True, "needs --sample-k K"),
    ("train_student", "lr", -1.0, "must be > 0"),
    ("losses", "dkd", {"beta": "abc"}, "beta"),
]


@pytest.mark.parametrize("section_name, key, value, message", CHECKED_BY_CHECK_PARAMS)
def test_check_params_refuses_what_a_later_stage_would(tmp_path, section_name, key, value, message):
    """`pipeline check-params` (dvc.yaml's first stage) fails on every value a later stage
    would refuse, naming the key, before DVC deletes any output."""
    from pathlib import Path

    import yaml
    from click.testing import CliRunner

    from pipeline.cli import cli

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    values[section_name][key] = value
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(values))
    result = CliRunner().invoke(cli, ["check-params", "--params", str(params)])
    assert result.exit_code == 1 and message in result.output, result.output
    assert f"{section_name}.{key}" in result.output or section_name == "losses"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "1e39"], "--lr: 1e+39 is out of range (at most ±3.4e38, float32)"),
        (["--alpha", "1e39"], "--alpha 1e+39 is out of range (at most ±3.4e38, float32)"),
    ],
)
def test_numbers_that_overflow_float32_are_range_errors(tmp_path, train_cache, args, message):
    """torch computes in float32: a setting beyond it would overflow deep in a run."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    data = ["--cache", str(train_cache), "--data", "digits:train", "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(cli, ["train-student", *data, "--epochs", "1", *args])
    assert result.exit_code == 1 and f"Error: {message}" in result.output, result.output
    assert "unexpected" not in result.output and not (tmp_path / "s").exists()


def test_an_augmentation_that_overflows_is_said_not_blamed_on_the_teacher(tmp_path, teacher_ckpt):
    from click.testing import CliRunner

    from pipeline.cli import cli

    args = ["precompute-logits", "--teacher", str(teacher_ckpt), "--data", "digits:test"]
    for std, message in (
        ("1e39", "noise std 1e39 is out of range (float32)"),
        ("1e38", "overflows float32 on these inputs"),
    ):
        out = tmp_path / f"{std}.zarr"
        extra = ["--views", "2", "--augment", f"noise:std={std}", "--out", str(out)]
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "teacher" not in result.output.split("Error:")[1]
