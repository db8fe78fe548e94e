"""Storage choices (dtype, compression, chunks, shards), determinism, provenance, bad teachers."""

import datetime
import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.cache import CacheWriter, layout, open_cache
from pipeline.cache.schema import LOGITS
from pipeline.cache.writer import finished_shards
from pipeline.core.config import PrecomputeConfig, as_dict
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import sha256_file
from pipeline.data import load_transfer_set
from stages import precompute_logits
from tests.cache.helpers import (
    hdf5_chunks,
    mlp_checkpoint,
    overflow_on_pixel,
    stable_attrs,
    zarr_files,
)
from tests.conftest import invoke
from tests.reference import teacher_forward
from tests.test_cli_errors import assert_clean_error


def write(path, logits, **kwargs):
    """A cache of `logits` (N, V, C) through the writer alone."""
    n = len(logits)
    with CacheWriter(
        path, sample_ids=np.arange(n) * 7, labels=np.arange(n) % 3, num_classes=logits.shape[-1],
        num_views=logits.shape[1], **kwargs,
    ) as writer:  # fmt: skip
        writer.add({LOGITS: logits[: n // 3]})  # uneven batches: the writer re-cuts them
        writer.add({LOGITS: logits[n // 3 :]})
        return writer.finish({"class_names": None})


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_bfloat16_round_trip_is_exact(tmp_path, suffix):
    rng = np.random.default_rng(0)
    exact = torch.from_numpy(rng.normal(size=(100, 2, 7)).astype(np.float32) * 50).bfloat16()
    out = write(tmp_path / f"b{suffix}", exact.float().numpy(), dtype="bfloat16", chunk_rows=8)
    with open_cache(out) as cache:
        assert cache.dtype == "bfloat16" and cache.attrs["logits_dtype"] == "bfloat16"
        assert cache.read_stored(LOGITS).dtype == np.uint16  # raw 16-bit words
        back = cache.logits_torch()
        assert back.dtype == torch.bfloat16
        assert torch.equal(back.view(torch.int16), exact.view(torch.int16))  # bit for bit
        np.testing.assert_array_equal(cache.logits(), exact.float().numpy())
        assert torch.equal(cache.logits_torch(slice(10, 20)), exact[10:20])


def test_bfloat16_rounds_float32_like_torch(tmp_path, teacher_ckpt):
    ts = load_transfer_set("digits:test")
    cfg = PrecomputeConfig(dtype="bfloat16")
    out = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", tmp_path / "b.zarr")
    with open_cache(out) as cache:
        logits = teacher_forward(teacher_ckpt, ts.inputs, cache.attrs["shard_rows"])
        expected = torch.from_numpy(logits).bfloat16()
        assert torch.equal(cache.logits_torch()[:, 0].view(torch.int16), expected.view(torch.int16))


def test_float16_overflow_is_refused_not_stored_as_inf(tmp_path):
    logits = np.zeros((10, 1, 3), np.float32)
    logits[4, 0, 1] = 1e5
    with pytest.raises(PipelineError, match=r"sample ids \[28\] overflow float16"):
        write(tmp_path / "o.zarr", logits, dtype="float16")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_compression_choice_is_applied(tmp_path, suffix):
    logits = np.tile(np.arange(10, dtype=np.float32), (4000, 1, 1))  # very compressible
    plain = write(tmp_path / f"n{suffix}", logits, compression="none")
    packed = write(tmp_path / f"z{suffix}", logits, compression="zstd:19")
    size = {
        p: sum(f.stat().st_size for f in [p, *p.rglob("*")] if f.is_file()) for p in (plain, packed)
    }
    assert size[plain] > logits.nbytes and size[plain] - size[packed] > 0.9 * logits.nbytes
    for path, spec in ((plain, "none"), (packed, "zstd:19")):
        with open_cache(path) as cache:
            assert cache.attrs["compression"] == spec
            np.testing.assert_array_equal(cache.logits(), logits)


def test_bad_storage_options_are_one_line_errors(tmp_path, runner, teacher_ckpt, train_cache):
    base = ["precompute-logits", "--teacher", teacher_ckpt, "--data", "digits:test"]
    out = tmp_path / "c.zarr"
    for option, value, message in [
        ("--compression", "zstd:99", "--compression 'zstd:99': expected auto, zstd:LEVEL (1-22)"),
        ("--compression", "gzip:10", "gzip:LEVEL (1-9)"),
        ("--chunk-rows", "-4", "--chunk-rows must be >= 0"),
        ("--chunks-per-shard", "-1", "--chunks-per-shard must be >= 0"),
        ("--batch-size", "0", "--batch-size must be >= 1"),
    ]:
        assert_clean_error(invoke(runner, *base, "--out", out, option, value), message)
        assert not out.exists() and not out.with_name("c.zarr.partial").exists()
    # A complete cache is never touched by a refused run, even with --overwrite.
    before = zarr_files(train_cache)
    result = invoke(runner, *base, "--out", train_cache, "--overwrite", "--compression", "lz4")
    assert_clean_error(result, "--compression 'lz4'")
    assert zarr_files(train_cache) == before


def test_default_layout_follows_the_measured_rules():
    # about 2 MiB per chunk, a power of two, at most 16384 rows; shards up to 16 chunks / 16384 rows
    assert layout.chunk_rows_for(10 * 4) == 16384
    assert layout.chunk_rows_for(1000 * 4) == 512
    assert layout.chunk_rows_for(1000 * 2) == 1024
    assert layout.chunk_rows_for(100 * 4) == 4096
    assert layout.chunks_per_shard_for(16384) == 1
    assert layout.chunks_per_shard_for(4096) == 4
    assert layout.chunks_per_shard_for(512) == 16
    assert layout.chunk_rows_for(40, requested=3) == 3
    assert layout.chunks_per_shard_for(512, requested=2) == 2


def test_chunk_rows_and_shards_make_the_files(tmp_path, teacher_ckpt):
    cfg = PrecomputeConfig(chunk_rows=16, chunks_per_shard=2)
    out = precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", tmp_path / "s.zarr")
    with open_cache(out) as cache:
        assert (cache.attrs["chunk_rows"], cache.attrs["shard_rows"]) == (16, 32)
    # 360 rows in shards of 32 rows: 12 files per array, each one shard of 2 chunks.
    shards = sorted(
        p.relative_to(out / "logits").as_posix()
        for p in (out / "logits/c").rglob("*")
        if p.is_file()
    )
    assert shards == sorted(f"c/{k}/0/0" for k in range(12))
    meta = json.loads((out / "logits/zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [16, 1, 10]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [32, 1, 10]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_two_runs_write_identical_bytes(tmp_path, teacher_ckpt, teacher_ckpt_mlp, suffix):
    cfg = PrecomputeConfig(keep_members=True, dtype="float16", chunk_rows=32, chunks_per_shard=2)
    ckpts = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    a = precompute_logits.run(cfg, ckpts, "digits:test", tmp_path / f"a{suffix}")
    b = precompute_logits.run(cfg, ckpts, "digits:test", tmp_path / f"b{suffix}")
    if suffix == ".zarr":
        assert zarr_files(a) == zarr_files(b)
    else:
        assert hdf5_chunks(a) == hdf5_chunks(b)
        assert not (tmp_path / "a.h5.partial").exists() and not (tmp_path / "a.h5.tmp").exists()
    with open_cache(a) as ca, open_cache(b) as cb:
        assert stable_attrs(ca.attrs) == stable_attrs(cb.attrs)


def test_provenance_and_inspect_show_everything(tmp_path, runner, teacher_ckpt, teacher_ckpt_mlp):
    ckpts = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    cfg = PrecomputeConfig(keep_members=True, dtype="float16")
    out = precompute_logits.run(cfg, ckpts, "digits:test", tmp_path / "p.h5")
    with open_cache(out) as cache:
        a = cache.attrs
    assert layout.PROGRESS not in a  # the resume record does not outlive the run
    assert [m["sha256"] for m in a["teacher"]["members"]] == [sha256_file(c) for c in ckpts]
    assert a["data"]["fingerprint"] == load_transfer_set("digits:test").fingerprint()
    expected = {"keep_members": True, "dtype": "float16", "teachers": ckpts}
    # views and augment are recorded only when used: a V = 1 cache is byte-identical to one
    # written before views existed
    defaults = {
        k: v
        for k, v in as_dict(PrecomputeConfig()).items()
        if k
        not in (
            "views",
            "augment",
            "features",
            "topk",
            "sample_k",
            "sample_values",
            "precision",
            "threads",  # a run's setting: in the run record, not in the cache
        )  # fmt: skip
    }
    assert a["params"] == {**defaults, **expected}
    assert {"package", "torch", "zarr", "h5py"} <= set(a["created_with"])
    assert a["created_with"]["torch"] == torch.__version__
    # No time of creation inside: the same run writes the same bytes. It is in the run record.
    assert "created_at" not in a
    record = json.loads(out.with_name("p.h5.run.json").read_text())
    assert datetime.datetime.fromisoformat(record["finished_at"]).tzinfo is not None
    assert record["command"] == "precompute-logits" and record["threads"] >= 1
    with open_cache(out) as cache:  # the record names the cache it is of
        assert record["of"] == {"cache": str(out), "identity": cache.identity}

    result = invoke(runner, "inspect", out)
    assert result.exit_code == 0, result.output
    text = result.output
    for ckpt in ckpts:
        assert sha256_file(ckpt) in text  # full digests, not prefixes
    assert a["data"]["fingerprint"] in text
    assert "members/logits" in text and "(2, 360, 1, 10)" in text
    assert "keep_members=True" in text and "dtype=float16" in text
    assert "created at" not in text and f"torch {torch.__version__}" in text
    assert "hdf5 (kd-target-cache v2)" in text
    assert "fletcher32 on every chunk, checked on every read; sha256 of every shard" in text
    shown = json.loads(invoke(runner, "inspect", out, "--json").output)
    assert shown["teacher"] == a["teacher"] and shown["num_shards"] == 1


def nan_teacher(tmp_path, pixel):
    """A teacher whose logits overflow exactly where `pixel` is lit, and those sample ids."""
    ckpt = mlp_checkpoint(tmp_path / "nan.pt", mutate=overflow_on_pixel(pixel))
    ts = load_transfer_set("digits:test")
    with np.errstate(over="ignore"):
        # Overflow is far from any rounding: any batching names the same rows.
        bad = ~np.isfinite(teacher_forward(ckpt, ts.inputs, shard_rows=len(ts))).all(axis=1)
    assert 0 < bad.sum() < len(bad)
    return ckpt, ts.sample_ids[bad]


def test_nan_teacher_stops_the_run_naming_the_first_bad_ids(tmp_path, runner, teacher_ckpt):
    ckpt, bad_ids = nan_teacher(tmp_path, pixel=19)  # lit in many samples
    out = tmp_path / "c.zarr"
    result = invoke(
        runner, "precompute-logits", "--teacher", ckpt, "--data", "digits:test", "--out", out
    )
    assert_clean_error(
        result, f"nan.pt produced NaN/Inf logits for sample ids {bad_ids[:5].tolist()}"
    )
    assert not out.exists() and not (tmp_path / "c.zarr.partial").exists()


def test_nan_in_a_later_shard_keeps_the_cache_incomplete(tmp_path, runner, train_cache):
    ckpt, bad_ids = nan_teacher(tmp_path, pixel=55)  # first lit in row 99 of digits:test
    good = tmp_path / "good.zarr"
    shutil.copytree(train_cache, good)
    before = zarr_files(good)
    args = ["precompute-logits", "--teacher", ckpt, "--data", "digits:test", "--out", good]
    result = invoke(runner, *args, "--overwrite", "--chunk-rows", "8", "--chunks-per-shard", "1")
    ts = load_transfer_set("digits:test")
    first = int(np.flatnonzero(np.isin(ts.sample_ids, bad_ids))[0])
    in_shard = bad_ids[np.isin(bad_ids, ts.sample_ids[first // 8 * 8 : first // 8 * 8 + 8])]
    assert_clean_error(result, f"for sample ids {in_shard[:5].tolist()}", "not complete")
    assert zarr_files(good) == before  # the good cache it would have replaced is intact
    partial = tmp_path / "good.zarr.partial"
    with open_cache(partial) as cache:
        assert cache.attrs["complete"] is False
    assert len(finished_shards(partial)) == first // 8
