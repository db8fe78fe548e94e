"""`pipeline verify --teacher T --data D --sample K`: stored rows against the live teacher."""

import numpy as np
import pytest
import zarr

from pipeline.cache.schema import LOGITS, SAMPLE_IDS
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from stages import precompute_logits
from stages import verify as stage
from tests.cache.helpers import reseal
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error


def test_a_cache_checked_against_its_own_teacher_passes(test_cache, teacher_ckpt):
    summary = stage.run(test_cache, "digits:test", [str(teacher_ckpt)], sample=16)
    assert summary["teacher_rows_checked"] == 16 and summary["teacher_sample_seed"] == 0
    assert len(set(summary["teacher_sample_ids"])) == 16
    again = stage.run(test_cache, "digits:test", [str(teacher_ckpt)], sample=16)
    assert again["teacher_sample_ids"] == summary["teacher_sample_ids"]  # seeded
    other = stage.run(test_cache, "digits:test", [str(teacher_ckpt)], sample=16, seed=1)
    assert other["teacher_sample_ids"] != summary["teacher_sample_ids"]
    everything = stage.run(test_cache, "digits:test", [str(teacher_ckpt)], sample=1000)
    assert everything["teacher_rows_checked"] == 360  # at most every row


def test_another_teacher_fails_naming_the_sample_ids(test_cache, teacher_ckpt_mlp):
    with pytest.raises(PipelineError) as e:
        stage.run(test_cache, "digits:test", [str(teacher_ckpt_mlp)], sample=16)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{test_cache}: 1 problem: ")
    assert "teacher spot check: logits of 16 of 16 sampled rows differ from --teacher" in message
    assert "sample ids [" in message and "largest difference" in message


def test_the_cli_runs_the_spot_check(runner, train_cache, teacher_ckpt, teacher_ckpt_mlp):
    args = ["verify", train_cache, "--data", "digits:train", "--sample", "16"]
    result = invoke(runner, *args, "--teacher", teacher_ckpt)
    assert result.exit_code == 0, result.output
    assert f"{train_cache}: ok (zarr, 1437 samples" in result.output
    result = invoke(runner, *args, "--teacher", teacher_ckpt_mlp)
    assert_clean_error(result, "teacher spot check: logits of 16 of 16 sampled rows", "sample ids")
    result = invoke(runner, "verify", train_cache, "--teacher", teacher_ckpt)
    assert_clean_error(result, "--teacher needs --data")
    result = invoke(runner, *args[:4], "--sample", "0", "--teacher", teacher_ckpt)
    assert_clean_error(result, "--sample must be >= 1, got 0")


@pytest.mark.parametrize("dtype, combine", [("bfloat16", "mean-probs"), ("float16", "mean-logits")])
def test_16_bit_ensembles_pass_within_one_unit(
    tmp_path, teacher_ckpt, teacher_ckpt_mlp, dtype, combine
):
    """Members recombined as the cache says and rounded through its dtype; members compared
    too when kept."""
    teachers = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    cfg = PrecomputeConfig(dtype=dtype, combine=combine, keep_members=True)
    out = precompute_logits.run(cfg, teachers, "digits:test", tmp_path / "e.zarr")
    summary = stage.run(out, "digits:test", teachers, sample=360)
    assert summary["teacher_rows_checked"] == 360
    with pytest.raises(PipelineError, match="1 --teacher given, the cache kept 2 members") as e:
        stage.run(out, "digits:test", teachers[:1], sample=8)
    assert "logits of 8 of 8 sampled rows differ" in str(e.value)  # one member is not the mean


def test_one_altered_value_is_named(tmp_path, teacher_ckpt):
    """A value rewritten with a valid checksum (so only the digest and the teacher know)."""
    out = precompute_logits.run(
        PrecomputeConfig(), [str(teacher_ckpt)], "digits:test", tmp_path / "c.zarr"
    )
    group = zarr.open_group(str(out), mode="r+")
    sid = int(group[SAMPLE_IDS][123])
    words = group[LOGITS][123:124]
    words[0, 0, 4] += np.float32(0.5)
    group[LOGITS][123:124] = words
    with pytest.raises(PipelineError, match="not what was written at this place"):
        stage.run(out, "digits:test", [str(teacher_ckpt)], sample=360)  # its seal says so
    reseal(out)  # sealed as it now is: only the teacher knows
    with pytest.raises(PipelineError) as e:
        stage.run(out, "digits:test", [str(teacher_ckpt)], sample=360)
    assert "1 problem" in str(e.value)
    assert (
        f"logits of 1 of 360 sampled rows differ from --teacher (sample ids [{sid}]; "
        f"largest difference 0.5 at sample id {sid})"
    ) in str(e.value)
