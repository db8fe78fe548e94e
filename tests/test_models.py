"""The student zoo: registry names, parameter counts, `pipeline models`."""

import pytest
import torch

from pipeline.core.errors import PipelineError
from pipeline.models import count_parameters, create_model, describe_models, list_models
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

ZOO = [
    "mlp",
    "cnn",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_2",
    "wrn_40_2",
    "wrn_28_10",
]


def test_zoo_is_registered():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize(
    "name, classes, params",
    [
        # Parameter counts of the CIFAR models in the KD literature (He et al.; CRD, Tian et al.)
        ("resnet20", 10, 272_474),
        ("resnet56", 10, 855_770),
        ("resnet110", 10, 1_730_714),
        ("resnet8x4", 100, 1_233_540),
        ("resnet32x4", 100, 7_433_860),
        ("wrn_40_2", 100, 2_255_156),
    ],
)
def test_parameter_counts_match_the_literature(name, classes, params):
    rows = {r["name"]: r for r in describe_models(classes, (3, 32, 32))}
    assert rows[name]["params"] == params
    assert count_parameters(create_model(name, classes, (3, 32, 32))) == params


def test_small_students_forward_shapes():
    for name in ("resnet8", "wrn_16_1", "cnn", "mlp"):
        net = create_model(name, 7, (3, 16, 16)).eval()
        assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 7), name


def test_models_command_lists_counts(runner):
    result = invoke(runner, "models")
    assert result.exit_code == 0
    assert "10 classes, input (3, 32, 32)" in result.output
    assert any(line.split()[:2] == ["resnet56", "855,770"] for line in result.output.splitlines())
    result = invoke(runner, "models", "--num-classes", "100", "--input-shape", "1,8,8", "--json")
    assert result.exit_code == 0
    assert result.output.lstrip().startswith("[")
    assert_clean_error(invoke(runner, "models", "--input-shape", "3,x"), "--input-shape")
    # At the data's shape: the cnn default is the digits teacher's 53,194 parameters, and the
    # mlp's default hidden size (128) gives 64·128 + 128 + 128·10 + 10.
    result = invoke(runner, "models", "--data", "digits:train")
    assert "parameters at 10 classes, input (1, 8, 8) (digits:train)" in result.output
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()[1:]}
    assert rows["cnn"] == "53,194" and rows["mlp"] == f"{64 * 128 + 128 + 128 * 10 + 10:,}"


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(
        PipelineError,
        match=r"unknown model 'resnet1000' \(valid: causal_transformer, cnn, gpt_micro, .*, mlp, "
        r"resnet",
    ):
        create_model("resnet1000", 10, (3, 32, 32))
