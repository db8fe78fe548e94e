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
