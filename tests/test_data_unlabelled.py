"""Data without labels is a first-class transfer set: soft targets only."""

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.student.losses import LOSSES
from tests.conftest import invoke
from tests.formats import assert_one_line_error, precompute, save_torchscript, tiny_net


@pytest.fixture
def unlabelled(tmp_path, runner):
    """(spec, cache) of an npz with inputs only, cached by a TorchScript teacher."""
    np.savez(tmp_path / "u.npz", x=np.random.default_rng(0).normal(size=(12, 2, 4, 4)))
    spec = f"npz:{tmp_path / 'u.npz'}"
    teacher = save_torchscript(tiny_net(2, 4), tmp_path / "t.pt")
    cache = tmp_path / "u.zarr"
    result = precompute(runner, teacher, spec, cache)
    assert result.exit_code == 0, result.output
    with open_cache(cache) as c:
        assert (c.labels == -1).all() and c.num_classes == 4
    return spec, cache


def _train(runner, tmp_path, unlabelled, *options):
    spec, cache = unlabelled
    args = ["--cache", cache, "--data", spec, "--out", tmp_path / "s", "--student", "mlp"]
    return invoke(runner, "train-student", *args, "--epochs", "1", *options)


@pytest.mark.parametrize("loss", [["--loss", "kd", "--alpha", "1"], ["--loss", "soft"]])
def test_soft_targets_alone_train_a_student(tmp_path, runner, unlabelled, loss):
    if loss[1] not in LOSSES:
        pytest.skip(f"loss {loss[1]} is not registered yet")
    result = _train(runner, tmp_path, unlabelled, *loss)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "student.pt").is_file()


def test_kd_with_alpha_below_one_is_a_clear_error(tmp_path, runner, unlabelled):
    result = _train(runner, tmp_path, unlabelled, "--loss", "kd", "--alpha", "0.5")
    assert_one_line_error(result, "has no labels", "--alpha 1")
    assert not (tmp_path / "s").exists()


def test_a_labels_only_loss_is_a_clear_error(tmp_path, runner, unlabelled):
    result = _train(runner, tmp_path, unlabelled, "--loss", "ce")
    assert_one_line_error(result, "needs labels")
