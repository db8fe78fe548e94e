"""Crash safety: kill -9 mid-run, then the same command resumes and ends byte-identical."""

import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.cache.writer import KILL_AT_SHARD_ENV, finished_shards
from pipeline.core.config import PrecomputeConfig
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import OutputLock
from pipeline.core.lock import KILL_AT_ENV
from pipeline.data import load_transfer_set
from pipeline.teacher import precompute as precompute_lib
from pipeline.teacher import shards as shards_lib
from stages import precompute_logits
from tests import procs
from tests.cache.helpers import ctrl_c_at_forward, hdf5_chunks, stable_attrs, zarr_files
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

ROOT = Path(__file__).resolve().parents[2]
# digits:test has 360 rows: shards of 2 chunks of 16 rows make 12 shards.
LAYOUT = {"chunk_rows": 16, "chunks_per_shard": 2, "keep_members": True}
LAYOUT_ARGS = ["--chunk-rows", "16", "--chunks-per-shard", "2", "--keep-members"]
TEMP = "0123456789abcdef0123456789abcdef"  # what a zarr write killed mid-way leaves behind


def command(ckpts, out, *extra) -> list[str]:
    teachers = [a for c in ckpts for a in ("--teacher", str(c))]
    return ["precompute-logits", *teachers, "--data", "digits:test", "--out", str(out)] + [
        *LAYOUT_ARGS,
        *extra,
    ]


def run_killed(args: list[str], kill_at: int) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself while writing shard `kill_at`."""
    env = {**os.environ, KILL_AT_SHARD_ENV: str(kill_at)}
    proc = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def all_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def attrs_of(path: Path) -> dict:
    with open_cache(path) as cache:
        return cache.attrs


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_kill_9_mid_shard_then_resume_is_byte_identical(
    tmp_path, runner, teacher_ckpt, teacher_ckpt_mlp, suffix
):
    ckpts = [teacher_ckpt, teacher_ckpt_mlp]
    out = tmp_path / "killed" / f"c{suffix}"
    args = command(ckpts, out, "--dtype", "bfloat16")
    run_killed(args, kill_at=5)

    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.is_dir()
    assert Path(f"{out}.lock").exists()  # the killed run's lock file; its flock died with it
    assert len(finished_shards(partial)) == 5 and attrs_of(partial)["complete"] is False
    # Killed inside shard 5: its logits are on disk, its members and its record are not.
    assert (partial / "logits/c/5/0/0").is_file()
    assert not (partial / "members/logits/c/0/5/0/0").exists()
    (partial / f"logits/c/5/0/0.{TEMP}.partial").write_bytes(b"torn write")
    first = partial / "logits/c/0/0/0"
    first_stat = (first.stat().st_ino, first.stat().st_mtime_ns)

    result = invoke(runner, *args)  # the same command again
    assert result.exit_code == 0, result.output
    assert out.exists() and not partial.exists()

    cfg = PrecomputeConfig(dtype="bfloat16", **LAYOUT)
    clean = precompute_logits.run(
        cfg, [str(c) for c in ckpts], "digits:test", tmp_path / "clean" / f"c{suffix}"
    )
    if suffix == ".zarr":
        assert zarr_files(out) == zarr_files(clean)  # every shard file, byte for byte
        done = out / "logits/c/0/0/0"  # finished shards were kept, not recomputed
        assert (done.stat().st_ino, done.stat().st_mtime_ns) == first_stat
    else:
        assert hdf5_chunks(out) == hdf5_chunks(clean)  # every dataset chunk, byte for byte
        assert not out.with_name(out.name + ".tmp").exists()
    assert stable_attrs(attrs_of(out)) == stable_attrs(attrs_of(clean))
    assert attrs_of(out)["complete"] is True and "progress" not in attrs_of(out)


@pytest.mark.slow
def test_a_partial_run_with_other_settings_is_refused_not_mixed(
    tmp_path, runner, teacher_ckpt, teacher_ckpt_mlp, train_cache
):
    out = tmp_path / "c.zarr"
    shutil.copytree(train_cache, out)  # a good cache the run is replacing (--overwrite)
    good = all_files(out)
    ckpts = [teacher_ckpt, teacher_ckpt_mlp]
    args = command(ckpts, out, "--overwrite")
    run_killed(args, kill_at=3)
    partial = tmp_path / "c.zarr.partial"
    frozen = all_files(partial)
    assert all_files(out) == good

    for other, fragments in [
        (["--dtype", "float16"], ["params.dtype: 'float32' there, 'float16' now"]),
        (["--batch-size", "64"], ["params.batch_size: 256 there, 64 now"]),
        (["--combine", "mean-probs"], ["params.combine"]),
    ]:
        result = invoke(runner, *args, *other)
        assert_clean_error(result, "holds an unfinished run with other settings", *fragments)
    result = invoke(runner, *command(ckpts[::-1], out, "--overwrite"))  # members swapped
    assert_clean_error(result, "teachers.0.name: 'cnn' there, 'mlp' now", f"delete {partial}")
    assert all_files(partial) == frozen and all_files(out) == good  # nothing mixed, nothing lost

    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    with open_cache(out) as cache:
        assert cache.complete and cache.num_members == 2


def test_interrupt_keeps_finished_shards_and_resume_matches(
    tmp_path, teacher_ckpt, teacher_ckpt_mlp, monkeypatch
):
    ckpts = [str(teacher_ckpt), str(teacher_ckpt_mlp)]
    cfg = PrecomputeConfig(**LAYOUT)
    forward = ctrl_c_at_forward(monkeypatch, 4)  # Ctrl-C while shard 3 is computed
    out = tmp_path / "c.zarr"
    with pytest.raises(KeyboardInterrupt):
        precompute_logits.run(cfg, ckpts, "digits:test", out)
    partial = tmp_path / "c.zarr.partial"
    assert len(finished_shards(partial)) == 3  # queued writes landed
    monkeypatch.setattr(shards_lib, "_forward", forward)

    precompute_logits.run(cfg, ckpts, "digits:test", out)
    clean = precompute_logits.run(cfg, ckpts, "digits:test", tmp_path / "clean.zarr")
    assert zarr_files(out) == zarr_files(clean)


def test_changed_data_is_refused_on_resume(tmp_path, teacher_ckpt, monkeypatch):
    cfg = PrecomputeConfig(chunk_rows=16, chunks_per_shard=2)
    forward = shards_lib._forward
    monkeypatch.setattr(shards_lib, "_forward", _fail_on_call(forward, 5))
    out = tmp_path / "c.zarr"
    with pytest.raises(RuntimeError):
        precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", out)
    monkeypatch.setattr(shards_lib, "_forward", forward)

    ts = load_transfer_set("digits:test")
    ts.inputs = ts.inputs.copy()
    ts.inputs[40] += np.float32(0.5)  # row 40 lies in finished shard 1
    monkeypatch.setattr(precompute_lib, "load_transfer_set", lambda spec, lazy=False: ts)
    with pytest.raises(
        PipelineError, match=r"digits:test changed since the interrupted run .*rows 32-63"
    ):
        precompute_logits.run(cfg, [str(teacher_ckpt)], "digits:test", out)
    assert len(finished_shards(tmp_path / "c.zarr.partial")) == 4


def _fail_on_call(forward, n):
    calls = []

    def fn(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("teacher crashed")
        return forward(*a, **kw)

    return fn


def test_a_second_writer_of_the_same_cache_is_refused(tmp_path, runner, teacher_ckpt):
    out = tmp_path / "c.zarr"
    args = ["precompute-logits", "--teacher", teacher_ckpt, "--data", "digits:test", "--out", out]
    assert invoke(runner, *args).exit_code == 0
    before = zarr_files(out)
    held = OutputLock(out)  # what a running precompute of the same output holds
    held.acquire()
    try:
        result = invoke(runner, *args, "--overwrite")
        assert_clean_error(result, f"{out} is being written by another process")
        assert zarr_files(out) == before  # the complete cache is untouched
        assert not Path(f"{out}.partial").exists()
    finally:
        held.release()
    assert invoke(runner, *args, "--overwrite").exit_code == 0
    assert zarr_files(out) == before  # same bytes again
    assert not Path(f"{out}.lock").exists()  # no litter beside a finished cache


def test_a_full_disk_is_said_in_one_line_and_the_finished_shards_resume(
    tmp_path, runner, teacher_ckpt, monkeypatch
):
    """ENOSPC in the middle of a run: one line saying so and what was kept, then the same
    command resumes from the finished shards once there is space again."""
    import errno

    from pipeline.cache.zarr_backend import ZarrBackend

    real, calls = ZarrBackend.write, []

    def full_after_some(self, name, offset, data):
        calls.append(name)
        if len(calls) > 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / name))
        return real(self, name, offset, data)

    monkeypatch.setattr(ZarrBackend, "write", full_after_some)
    out = tmp_path / "c.zarr"
    args = ["precompute-logits", "--teacher", teacher_ckpt, "--data", "digits:test",
            "--chunk-rows", "16", "--chunks-per-shard", "2", "--out", out]  # fmt: skip
    result = invoke(runner, *args)
    assert_clean_error(
        result,
        "no space left on the device while writing",
        f"free some space: the finished shards are kept in {out}.partial; run the same "
        "command again to resume from them",
    )
    assert not out.exists() and (tmp_path / "c.zarr.partial").is_dir()
    monkeypatch.setattr(ZarrBackend, "write", real)
    assert invoke(runner, *args).exit_code == 0
    clean = precompute_logits.run(
        PrecomputeConfig(chunk_rows=16, chunks_per_shard=2), [str(teacher_ckpt)], "digits:test",
        tmp_path / "clean.zarr",
    )  # fmt: skip
    assert zarr_files(out) == zarr_files(clean)


@pytest.mark.slow
def test_a_run_killed_while_moving_the_cache_into_place_is_published_not_recomputed(
    tmp_path, runner, teacher_ckpt, train_cache
):
    out = tmp_path / "c.zarr"
    shutil.copytree(train_cache, out)  # the old cache --overwrite replaces
    args = command([teacher_ckpt], out, "--overwrite")
    env = {**os.environ, KILL_AT_ENV: "swap-aside:c.zarr"}
    proc = procs.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # the old cache is aside, the new one whole in c.zarr.partial
    finished = zarr_files(out.with_name("c.zarr.partial"))

    result = invoke(runner, *args)  # the same command again
    assert result.exit_code == 0, result.output
    assert "finished by an interrupted run of this command" in result.output
    assert zarr_files(out) == finished  # moved into place, not computed again
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("c.zarr")) == ["c.zarr"]
