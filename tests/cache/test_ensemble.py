"""Ensembles: mean-logits and mean-probs against hand computation, kept members, mismatches."""

import numpy as np
import pytest
import torch

from pipeline.cache import open_cache
from pipeline.cache.ensemble import combine_members
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from stages import precompute_logits
from tests.cache.helpers import mlp_checkpoint
from tests.conftest import invoke
from tests.reference import teacher_forward
from tests.test_cli_errors import assert_clean_error

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 8.0]


def members_fixture() -> np.ndarray:
    """Three members that disagree, with a large spread of logit scales.  # (M=3, N=4, V=1, C=5)"""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 4, 1, 5)).astype(np.float32)
    z[0] *= 8.0  # a confident member
    z[2, 1] = [30.0, -30.0, 0.0, 5.0, -5.0]  # extreme logits must not overflow
    return z


def softmax(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.softmax(x.double() / t, dim=-1)


@pytest.mark.parametrize("t", TEMPERATURES)
def test_mean_probs_is_the_average_of_member_softmaxes_at_t(t):
    z = members_fixture()
    out = combine_members(z, "mean-probs", t)
    assert out.shape == (4, 1, 5) and out.dtype == np.float32
    # By hand: p = (1/M) Σ_m softmax(z_m / T), one sample and class at a time.
    expected = np.zeros((4, 1, 5))
    for m in range(3):
        for i in range(4):
            e = np.exp((z[m, i, 0].astype(np.float64) - z[m, i, 0].max()) / t)
            expected[i, 0] += e / e.sum() / 3
    got = softmax(torch.from_numpy(out), t).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("t", TEMPERATURES)
def test_mean_logits_is_the_softmax_of_the_average_logits(t):
    z = members_fixture()
    out = combine_members(z, "mean-logits", t)
    np.testing.assert_allclose(out, z.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    expected = softmax(torch.from_numpy(z).double().mean(0), t).numpy()
    np.testing.assert_allclose(softmax(torch.from_numpy(out), t).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_the_two_methods_differ_except_for_one_member(t):
    z = members_fixture()
    a = softmax(torch.from_numpy(combine_members(z, "mean-logits", t)), t)
    b = softmax(torch.from_numpy(combine_members(z, "mean-probs", t)), t)
    assert (a - b).abs().max() > 1e-2  # averaging probabilities is not softmax(mean logits / T)
    one = z[:1]
    np.testing.assert_allclose(
        softmax(torch.from_numpy(combine_members(one, "mean-probs", t)), t),
        softmax(torch.from_numpy(one[0]), t),
        atol=1e-6,
    )


def test_combine_refuses_bad_method_and_temperature():
    with pytest.raises(PipelineError, match="combine 'median'"):
        combine_members(members_fixture(), "median", 1.0)
    with pytest.raises(PipelineError, match="temperature must be > 0"):
        combine_members(members_fixture(), "mean-probs", 0.0)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_keep_members_stores_each_teachers_own_forward(
    tmp_path, teacher_ckpt, teacher_ckpt_mlp, suffix
):
    ts = load_transfer_set("digits:test")
    cfg = PrecomputeConfig(keep_members=True, chunk_rows=64, chunks_per_shard=2)
    ckpts = [teacher_ckpt, teacher_ckpt_mlp]
    out = precompute_logits.run(
        cfg, [str(c) for c in ckpts], "digits:test", tmp_path / f"e{suffix}"
    )
    with open_cache(out) as cache:
        assert cache.num_members == 2
        members = cache.member_logits()
        logits = cache.logits()
        assert members.shape == (2, 360, 1, 10) and logits.shape == (360, 1, 10)
        assert cache.attrs["teacher"]["members_kept"] is True
        assert cache.attrs["num_members"] == 2
        np.testing.assert_array_equal(cache.member_logits(slice(100, 200)), members[:, 100:200])
        shard_rows = cache.attrs["shard_rows"]
    for m, ckpt in enumerate(ckpts):  # on precompute's batches: bit for bit
        want = teacher_forward(ckpt, ts.inputs, shard_rows)
        np.testing.assert_array_equal(members[m, :, 0], want)
    # The stored logits are exactly the combination of the stored members.
    np.testing.assert_array_equal(logits, combine_members(members, "mean-logits", 1.0))


def test_mean_probs_at_precompute_is_log_mean_probs_at_t1(tmp_path, teacher_ckpt, teacher_ckpt_mlp):
    cfg = PrecomputeConfig(combine="mean-probs", keep_members=True)
    ckpts = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    out = precompute_logits.run(cfg, ckpts, "digits:test", tmp_path / "p.zarr")
    with open_cache(out) as cache:
        members, logits = cache.member_logits(), cache.logits()
        assert cache.attrs["teacher"]["combine"] == "mean-probs"
    expected = softmax(torch.from_numpy(members), 1.0).mean(0).numpy()
    np.testing.assert_allclose(softmax(torch.from_numpy(logits), 1.0).numpy(), expected, atol=1e-6)


def test_without_keep_members_there_is_no_members_array(train_cache):
    with open_cache(train_cache) as cache:
        assert not cache.has_members and cache.num_members == 0
        with pytest.raises(PipelineError, match="--keep-members"):
            cache.member_logits()


def test_members_with_different_class_names_are_refused(tmp_path, runner):
    a = mlp_checkpoint(tmp_path / "a.pt", class_names=[str(i) for i in range(10)])
    b = mlp_checkpoint(tmp_path / "b.pt", class_names=[f"c{i}" for i in range(10)], seed=1)
    out = tmp_path / "c.zarr"
    result = invoke(
        runner, "precompute-logits", "--teacher", a, "--teacher", b, "--data", "digits:test",
        "--out", out, "--keep-members",
    )  # fmt: skip
    assert_clean_error(result, "b.pt", "class names differ")
    assert not out.exists() and not out.with_name("c.zarr.partial").exists()


def test_members_with_different_class_counts_are_refused(tmp_path):
    a = mlp_checkpoint(tmp_path / "a.pt")
    b = mlp_checkpoint(tmp_path / "b.pt", num_classes=7)
    with pytest.raises(PipelineError, match="has 7 classes"):
        precompute_logits.run(PrecomputeConfig(), [str(a), str(b)], "digits:test", tmp_path / "c")
