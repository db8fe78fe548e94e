"""Stage one: cached logits are the teacher's own forward, with provenance."""

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.core.config import PrecomputeConfig
from pipeline.core.fsutil import sha256_file
from pipeline.data import load_transfer_set
from stages import precompute_logits
from tests.conftest import invoke
from tests.reference import teacher_forward
from tests.test_cli_errors import assert_clean_error


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_float32_cache_equals_teacher_forward_exactly(tmp_path, teacher_ckpt, suffix):
    ts = load_transfer_set("digits:test")
    out = precompute_logits.run(
        PrecomputeConfig(), [str(teacher_ckpt)], "digits:test", tmp_path / f"c{suffix}"
    )
    with open_cache(out) as cache:
        assert cache.format == ("hdf5" if suffix == ".h5" else "zarr")
        assert cache.complete
        logits = cache.logits()
        assert logits.shape == (360, 1, 10) and logits.dtype == np.float32
        want = teacher_forward(teacher_ckpt, ts.inputs, cache.attrs["shard_rows"])
        np.testing.assert_array_equal(logits[:, 0], want)
        np.testing.assert_array_equal(cache.sample_ids, ts.sample_ids)
        np.testing.assert_array_equal(cache.labels, ts.labels)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_float16_cache_is_the_forward_rounded_once(tmp_path, teacher_ckpt, suffix):
    ts = load_transfer_set("digits:test")
    cfg = PrecomputeConfig(dtype="float16")
    out = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", tmp_path / f"c{suffix}")
    with open_cache(out) as cache:
        stored = cache.read_stored("logits")
        assert stored.dtype == np.float16
        logits = cache.logits()[:, 0]
        ref = teacher_forward(teacher_ckpt, ts.inputs, cache.attrs["shard_rows"])
    # Within half-precision rounding of the float32 forward, and exactly its nearest float16.
    np.testing.assert_allclose(logits, ref, rtol=2**-11, atol=2**-24)
    np.testing.assert_array_equal(logits, ref.astype(np.float16).astype(np.float32))


def test_ensemble_averages_member_logits(tmp_path, teacher_ckpt, teacher_ckpt_mlp):
    ts = load_transfer_set("digits:test")
    members = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    out = precompute_logits.run(PrecomputeConfig(), members, "digits:test", tmp_path / "e.zarr")
    with open_cache(out) as cache:
        a, b = (teacher_forward(c, ts.inputs, cache.attrs["shard_rows"]) for c in members)
        # (a + b) / 2 in float32, not combine_members' float64 mean: equal within rounding.
        np.testing.assert_allclose(cache.logits()[:, 0], (a + b) / 2, rtol=1e-6, atol=1e-6)
        teacher = cache.attrs["teacher"]
    assert [m["name"] for m in teacher["members"]] == ["cnn", "mlp"]
    assert teacher["members"][1]["sha256"] == sha256_file(teacher_ckpt_mlp)
    assert teacher["combine"] == "mean-logits"


def test_provenance_attributes(train_cache, teacher_ckpt):
    ts = load_transfer_set("digits:train")
    with open_cache(train_cache) as cache:
        a = cache.attrs
    assert a["format"] == "kd-target-cache" and a["complete"] is True
    assert (a["num_samples"], a["num_views"], a["num_classes"]) == (1437, 1, 10)
    assert a["class_names"] == [str(i) for i in range(10)]
    assert a["data"]["fingerprint"] == ts.fingerprint()
    assert a["data"]["spec"] == "digits:train"
    assert a["teacher"]["members"][0]["sha256"] == sha256_file(teacher_ckpt)
    assert a["params"]["dtype"] == "float32"
    assert {"package", "torch", "zarr", "h5py"} <= set(a["created_with"])


def test_teachers_come_from_params_yaml_unless_given(
    tmp_path, runner, teacher_ckpt, teacher_ckpt_mlp
):
    params = tmp_path / "params.yaml"
    params.write_text(f"precompute_logits:\n  teachers: ['{teacher_ckpt_mlp}']\n")
    base = ["precompute-logits", "--params", params, "--data", "digits:test"]
    assert invoke(runner, *base, "--out", tmp_path / "p.zarr").exit_code == 0
    given = ["--teacher", teacher_ckpt, "--out", tmp_path / "c.zarr"]
    assert invoke(runner, *base, *given).exit_code == 0
    ts = load_transfer_set("digits:test")
    for out, ckpt in (("p.zarr", teacher_ckpt_mlp), ("c.zarr", teacher_ckpt)):
        with open_cache(tmp_path / out) as cache:
            assert cache.attrs["params"]["teachers"] == [str(ckpt)]
            assert cache.attrs["teacher"]["members"][0]["sha256"] == sha256_file(ckpt)
            want = teacher_forward(ckpt, ts.inputs, cache.attrs["shard_rows"])
            np.testing.assert_array_equal(cache.logits()[:, 0], want)

    params.write_text("precompute_logits:\n  dtype: float16\n")
    result = invoke(runner, *base, "--out", tmp_path / "none.zarr")
    assert_clean_error(result, "no teacher", "--teacher")
    params.write_text("precompute_logits:\n  teachers: models/t.pt\n")
    assert_clean_error(invoke(runner, *base, "--out", tmp_path / "bad.zarr"), "teachers")


def test_class_names_that_do_not_count_the_classes_are_refused_before_writing(tmp_path, runner):
    from tests.cache.helpers import mlp_checkpoint

    names = [f"c{i}" for i in range(9)]  # 9 names, 10 outputs
    ckpt = mlp_checkpoint(tmp_path / "t.pt", num_classes=10, class_names=names)
    out = tmp_path / "c.zarr"
    result = invoke(
        runner, "precompute-logits", "--teacher", ckpt, "--data", "digits:test", "--out", out
    )
    assert_clean_error(result, f"--teacher {ckpt}: 9 class names for the 10 classes it outputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.pt"]  # nothing written
