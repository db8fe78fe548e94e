"""`pipeline verify` catches damage; `pipeline convert-cache` round-trips losslessly."""

import json
import shutil

import h5py
import numpy as np
import pytest
import zarr

from pipeline.cache import open_cache
from pipeline.cache.schema import LOGITS, SAMPLE_IDS
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from stages import precompute_logits
from tests.cache.helpers import hdf5_chunks, portable_attrs, reseal, zarr_files
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, teacher_ckpt, teacher_ckpt_mlp):
    """A bfloat16 cache of two members in 12 shards of 32 rows (digits:test, 360 rows)."""
    cfg = PrecomputeConfig(dtype="bfloat16", keep_members=True, chunk_rows=16, chunks_per_shard=2)
    out = tmp_path_factory.mktemp("sharded") / "c.zarr"
    return precompute_logits.run(
        cfg, [str(teacher_ckpt), str(teacher_ckpt_mlp)], "digits:test", out
    )


@pytest.fixture
def damaged(tmp_path, sharded):
    """A private copy of `sharded` to break."""
    path = tmp_path / "c.zarr"
    shutil.copytree(sharded, path)
    return path


def test_verify_passes_on_good_caches_of_both_formats(runner, sharded, test_cache):
    result = invoke(runner, "verify", sharded, "--data", "digits:test")
    assert result.exit_code == 0, result.output
    assert "ok (zarr, 360 samples, every node read, all 12 shard(s), no NaN/Inf, fingerprint" in (
        result.output
    )
    result = invoke(runner, "verify", test_cache)
    assert result.exit_code == 0 and "ok (hdf5, 360 samples" in result.output


def test_verify_with_other_data_fails_the_fingerprint(runner, sharded):
    result = invoke(runner, "verify", sharded, "--data", "digits:train")
    assert_clean_error(result, "1 problem: built from other data than --data digits:train")


def test_verify_catches_a_truncated_shard_file(runner, damaged):
    shard = damaged / "logits/c/3/0/0"
    shard.write_bytes(shard.read_bytes()[:-40])
    result = invoke(runner, "verify", damaged)
    assert_clean_error(
        result, f"{damaged}: 1 problem: logits: rows 96-127 damaged (checksum mismatch)"
    )


def test_verify_catches_a_missing_shard_file(runner, damaged):
    (damaged / "members/logits/c/0/11/0/0").unlink()
    result = invoke(runner, "verify", damaged)
    assert_clean_error(result, "members/logits: rows 352-359 missing")


def test_verify_catches_nan_and_names_the_sample(runner, damaged):
    group = zarr.open_group(str(damaged), mode="r+")
    ids = group[SAMPLE_IDS][:]
    words = group[LOGITS][200:201]
    words[0, 0, 3] = 0x7FC0  # bfloat16 NaN
    group[LOGITS][200:201] = words
    result = invoke(runner, "verify", damaged)
    assert_clean_error(result, "logits: rows 192-223 not what was written at this place")
    reseal(damaged)  # written with a NaN and sealed so: the values' own check finds it
    result = invoke(runner, "verify", damaged)
    assert_clean_error(result, f"logits: NaN/Inf for sample ids [{ids[200]}]")


def test_verify_catches_inconsistent_attributes_and_incomplete_caches(runner, damaged):
    meta = damaged / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(complete=False, num_classes=11)
    meta.write_text(json.dumps(doc))
    result = invoke(runner, "verify", damaged)
    assert_clean_error(
        result,
        "problems: its attributes differ from the digest recorded when it was written",
        "not complete",
        "logits: (360, 1, 10) uint16, attributes say (360, 1, 11)",
    )
    with pytest.raises(PipelineError, match=f"cache {damaged} is damaged: its attributes differ"):
        open_cache(damaged)  # every other reader refuses it outright


def test_verify_catches_hdf5_damage(tmp_path, runner, sharded):
    h5 = tmp_path / "c.h5"
    assert invoke(runner, "convert-cache", sharded, h5).exit_code == 0
    with h5py.File(h5, "r") as f:
        info = f[LOGITS].id.get_chunk_info(5)
    data = bytearray(h5.read_bytes())
    data[info.byte_offset : info.byte_offset + info.size] = bytes(info.size)  # zero a chunk
    h5.write_bytes(bytes(data))
    result = invoke(runner, "verify", h5)
    assert_clean_error(result, "1 problem: logits: rows 80-95 damaged (checksum mismatch)")

    h5.write_bytes(bytes(data[: len(data) // 2]))  # truncated file
    result = invoke(runner, "verify", h5)
    assert_clean_error(result, f"{h5}: cannot open as hdf5")


@pytest.mark.parametrize("first", [".h5", ".zarr"])
def test_convert_round_trip_is_lossless(tmp_path, runner, sharded, first):
    src = sharded
    if first == ".h5":  # start from an HDF5 cache written by precompute itself
        src = tmp_path / "src.h5"
        assert invoke(runner, "convert-cache", sharded, src).exit_code == 0
    other = tmp_path / ("mid.zarr" if first == ".h5" else "mid.h5")
    back = tmp_path / f"back{first}"
    assert invoke(runner, "convert-cache", src, other).exit_code == 0
    result = invoke(runner, "convert-cache", other, back)
    assert result.exit_code == 0 and f"cache converted to {back}" in result.output

    for path in (other, back):
        with open_cache(src) as a, open_cache(path) as b:
            assert b.format == ("hdf5" if path.suffix == ".h5" else "zarr")
            # Every attribute, `complete` included; shard digests are of each format's bytes.
            assert portable_attrs(a.attrs) == portable_attrs(b.attrs)
            assert (a.attrs == b.attrs) == (a.format == b.format)
            assert a.nodes() == b.nodes()
            for name in [node.name for node in a.nodes()]:
                x, y = a.read_stored(name), b.read_stored(name)
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        assert invoke(runner, "verify", path, "--data", "digits:test").exit_code == 0
    if first == ".zarr":
        assert zarr_files(back, root=False) == zarr_files(sharded, root=False)  # even the shards
    else:
        assert hdf5_chunks(back) == hdf5_chunks(src)


def test_convert_refusals_are_clean_and_harmless(tmp_path, runner, sharded, damaged):
    dst = tmp_path / "taken.h5"
    dst.write_bytes(b"precious")
    assert_clean_error(
        invoke(runner, "convert-cache", sharded, dst), "already exists (pass --overwrite"
    )
    assert dst.read_bytes() == b"precious"
    assert_clean_error(invoke(runner, "convert-cache", sharded, sharded), "same path")
    assert_clean_error(
        invoke(runner, "convert-cache", tmp_path / "none.zarr", dst), "cache not found"
    )

    meta = damaged / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    assert_clean_error(invoke(runner, "convert-cache", damaged, tmp_path / "x.h5"), "incomplete")
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.tmp").exists()

    result = invoke(runner, "convert-cache", sharded, dst, "--overwrite")
    assert result.exit_code == 0
    with open_cache(dst) as cache, open_cache(sharded) as original:
        assert cache.complete and np.array_equal(cache.sample_ids, original.sample_ids)
