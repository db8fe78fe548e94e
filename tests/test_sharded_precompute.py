"""Precompute under torchrun: 2 CPU ranks (gloo) write the cache one process writes, byte for
byte, and a run killed on one rank resumes with any number of ranks."""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.cache.writer import KILL_AT_SHARD_ENV, finished_shards
from pipeline.core.config import PrecomputeConfig
from pipeline.data import Fingerprint, load_transfer_set, part
from stages import precompute_logits
from tests import procs
from tests.cache.helpers import hdf5_chunks, stable_attrs, zarr_files
from tests.cache.test_resume import LAYOUT, command
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], ranks: int = 2, kill_at: int | None = None):
    """`pipeline ARGS` under torchrun with `ranks` CPU processes (gloo); with `kill_at`, the
    rank writing shard `kill_at` SIGKILLs itself in the middle of it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(KILL_AT_SHARD_ENV, None)
    if kill_at is not None:
        env[KILL_AT_SHARD_ENV] = str(kill_at)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(ranks), "-m", "pipeline", *args,
    ]  # fmt: skip
    return procs.run(cmd, cwd=ROOT, env=env)


def single(ckpts, out: Path, dtype: str = "float32") -> Path:
    cfg = PrecomputeConfig(dtype=dtype, **LAYOUT)
    return precompute_logits.run(cfg, [str(c) for c in ckpts], "digits:test", out)


def same_cache(a: Path, b: Path) -> None:
    """Every stored byte and every attribute but created_at."""
    if a.suffix == ".zarr":
        assert zarr_files(a) == zarr_files(b)
    else:
        assert hdf5_chunks(a) == hdf5_chunks(b)
    with open_cache(a) as x, open_cache(b) as y:
        assert stable_attrs(x.attrs) == stable_attrs(y.attrs)


def test_fingerprint_parts_add_up_whatever_the_split():
    ts = load_transfer_set("digits:test")
    whole = ts.fingerprint()
    for cuts in ([0, 360], [0, 7, 200, 360], [0, 32, 64, 96, 360]):
        fp = Fingerprint(ts.input_shape, "float32")
        pieces = list(zip(cuts, cuts[1:], strict=False))
        for a, b in reversed(pieces):  # any order: ranks finish when they finish
            fp.add(part(a, ts.sample_ids[a:b], ts.inputs[a:b]), b - a)
        assert fp.hexdigest() == whole
    moved = ts.inputs.copy()
    moved[[3, 4]] = moved[[4, 3]]  # two rows swapped: the same bytes, another order
    swapped = Fingerprint(ts.input_shape, "float32")
    swapped.update(ts.sample_ids, moved)
    assert swapped.hexdigest() != whole
    assert ts.fingerprint("stream") != whole  # caches of earlier versions keep their scheme


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "resume_ranks"), [(".zarr", 2), (".h5", 1)])
def test_one_rank_killed_then_resumed_with_any_ranks_is_byte_identical(
    tmp_path, teacher_ckpt, teacher_ckpt_mlp, suffix, resume_ranks
):
    ckpts = [teacher_ckpt, teacher_ckpt_mlp]
    out = tmp_path / "killed" / f"c{suffix}"
    args = command(ckpts, out, "--dtype", "bfloat16")
    killed = torchrun(args, kill_at=3)  # shard 3 is rank 1's: 1, 3, 5, ... of 12
    # The killed run's shards were written by both ranks; the resumed run's by 2 ranks (or 1):
    # each compared with one uninterrupted process, byte for byte.
    assert killed.returncode != 0
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.is_dir()
    done = finished_shards(partial)
    assert 1 in done and 3 not in done and 0 in done  # rank 1 died in shard 3, after shard 1
    assert (partial / "logits/c/3/0/0").is_file()  # its logits landed, its record did not

    if resume_ranks == 2:
        resumed = torchrun(args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert resumed.stderr.count("projected cache size") == 1  # rank 0 alone speaks
    else:
        resumed = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert out.exists() and not partial.exists()
    same_cache(out, single(ckpts, tmp_path / "one" / f"c{suffix}", "bfloat16"))
    with open_cache(out) as cache:
        assert cache.attrs["shard_rows"] == 32  # 12 shards of digits:test's 360 rows
        assert cache.fingerprint == load_transfer_set("digits:test").fingerprint()


@pytest.mark.slow
def test_killed_in_one_process_resumed_by_two_ranks(tmp_path, teacher_ckpt):
    out = tmp_path / "c.zarr"
    args = command([teacher_ckpt], out)
    env = {**os.environ, KILL_AT_SHARD_ENV: "4"}
    proc = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env)
    assert proc.returncode == -signal.SIGKILL
    kept = finished_shards(out.with_name("c.zarr.partial"))
    assert sorted(kept) == [0, 1, 2, 3]
    first = out.with_name("c.zarr.partial") / "logits/c/0/0/0"
    before = (first.stat().st_ino, first.stat().st_mtime_ns)
    resumed = torchrun(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = out / "logits/c/0/0/0"
    assert (done.stat().st_ino, done.stat().st_mtime_ns) == before  # kept, not recomputed
    same_cache(out, single([teacher_ckpt], tmp_path / "one" / "c.zarr"))
    with open_cache(out) as cache:
        logits = cache.read("logits")[:, 0]
    assert np.isfinite(logits).all() and logits.shape == (360, 10)


def test_under_torchrun_an_error_names_its_rank(tmp_path, runner, teacher_ckpt, monkeypatch):
    out = tmp_path / "c.zarr"
    out.mkdir()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke(runner, *command([teacher_ckpt], out))
    assert_clean_error(result, f"rank 1: {out} already exists")


@pytest.mark.parametrize("rows", [9, 360, 1797, 20000, 50000])
@pytest.mark.parametrize("chunk_rows", [16, 360, 1024, 16384])
@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_the_idle_ranks_advice_gives_every_rank_a_shard(rows, chunk_rows, ranks):
    """The note printed when ranks outnumber shards names options that, applied, make at
    least as many shards as ranks (whatever the chunking was)."""
    from pipeline.cache import layout
    from pipeline.teacher.precompute import idle_advice

    options = idle_advice(rows, min(chunk_rows, rows), ranks).split()
    given = dict(zip(options[::2], map(int, options[1::2]), strict=True))
    chunk = layout.chunk_rows_for(0, given.get("--chunk-rows", min(chunk_rows, rows)))
    shard_rows = chunk * layout.chunks_per_shard_for(chunk, given["--chunks-per-shard"])
    assert layout.num_shards(rows, shard_rows) >= ranks, (options, shard_rows)
