"""Kills at every step of the finish: the next run of the same command leaves nothing behind.
(The loop over every step is in tests/test_attack_bar.py; these are the cases around it.)

A child process (tests/cache/kill_writer.py) writes a cache, or a directory the way
train-student writes a student, and SIGKILLs itself at one step of its finish (the test hook
`KILL_AT_ENV`): once the cache is complete, after the HDF5 conversion, once the move is
journaled, once the old output is moved aside, once the new one is in place, once the old one
and the side files are gone; on object storage, once the old root is deleted, once the objects
are copied, once the new root is written. Then the same command runs again here, and must
succeed, leave only the output (no `.tmp-*`, `.old-*`, `.partial`, `.lock`, training log or
resume checkpoint), and leave the very output an uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from pipeline.cache import open_cache
from pipeline.core.lock import KILL_AT_ENV, OutputLock
from tests import procs
from tests.cache import kill_writer
from tests.cache.helpers import hdf5_chunks, zarr_files

pytest_plugins = ["tests.s3server"]
ROOT = Path(__file__).resolve().parents[2]

ZARR_POINTS = ["finish-complete", "swap-journaled", "swap-aside", "swap-moved", "swap-cleaned"]
HDF5_POINTS = ["hdf5-converted", "swap-journaled", "swap-aside", "swap-moved", "swap-cleaned"]
URL_POINTS = ["finish-complete", "publish-unrooted", "publish-copied", "publish-rooted"]
DIR_POINTS = ["swap-journaled", "swap-aside", "swap-moved", "swap-cleaned"]


def run_killed(args: list[str], point: str, name: str, env: dict | None = None) -> None:
    """Run kill_writer with `args`, killed at `point` of writing the output `name`."""
    env = {**os.environ, **(env or {}), KILL_AT_ENV: f"{point}:{name}"}
    cmd = [sys.executable, "-m", "tests.cache.kill_writer", *args]
    proc = procs.run(cmd, cwd=ROOT, env=env)
    assert proc.returncode == -signal.SIGKILL, (point, proc.stdout, proc.stderr)


def content(path: Path):
    """What an output holds, byte for byte."""
    if path.suffix == ".h5":
        with open_cache(path) as cache:
            return hdf5_chunks(path), cache.attrs
    if path.suffix == ".zarr":
        return zarr_files(path)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def reference(tmp_path: Path, name: str, seed: int, fmt: str = "auto") -> object:
    """The output an uninterrupted run writes."""
    out = tmp_path / "reference" / str(seed) / name
    if out.exists():
        return content(out)
    if name.endswith((".zarr", ".h5")):
        kill_writer.write_cache(str(out), seed, overwrite=False, fmt=fmt)
    else:
        kill_writer.write_dir(out, seed, overwrite=False)
    return content(out)


def cases(points: list[str]) -> list[tuple[str, bool]]:
    """Each point with and without an old output to replace (moving it aside, or deleting its
    root, needs one)."""
    needs_old = ("swap-aside", "publish-unrooted")
    return [(p, old) for p in points for old in (True, False) if old or p not in needs_old]


def looks_complete_or_absent(out: Path, old, new) -> None:
    """What a kill leaves at `out`: the old output, the new one, or nothing; never a part."""
    if out.exists():
        assert content(out) in (old, new)


CACHE_CASES = [(".zarr", p, old) for p, old in cases(ZARR_POINTS)] + [
    (".h5", p, old) for p, old in cases(HDF5_POINTS)
]


@pytest.mark.slow
def test_another_run_after_a_kill_puts_the_old_cache_back_and_drops_the_killed_ones(tmp_path):
    out = tmp_path / "run" / "c.zarr"
    kill_writer.write_cache(str(out), 1, overwrite=False)
    run_killed(["cache", str(out), "2", "--overwrite"], "swap-aside", out.name)
    assert not out.exists()  # the old cache is aside, the new one not yet in place

    assert kill_writer.write_cache(str(out), 3, overwrite=True) == "written"  # other settings
    assert sorted(os.listdir(out.parent)) == [out.name]
    assert content(out) == reference(tmp_path, out.name, 3)


@pytest.mark.slow
def test_without_overwrite_a_cache_the_killed_run_put_in_place_is_kept_and_said(tmp_path):
    out = tmp_path / "run" / "c.zarr"
    run_killed(["cache", str(out), "2"], "swap-moved", out.name)
    with pytest.raises(Exception, match="already exists"):
        kill_writer.write_cache(str(out), 2, overwrite=False)
    assert sorted(os.listdir(out.parent)) == [out.name]  # the lock is cleaned up all the same
    assert content(out) == reference(tmp_path, out.name, 2)


def test_a_lock_file_that_is_not_ours_is_refused_not_deleted(tmp_path):
    out = tmp_path / "c.zarr"
    lock = out.with_name("c.zarr.lock")
    lock.write_text("my own notes\n")
    with pytest.raises(Exception, match="c.zarr.lock exists and is not a lock file of kd-pipeline"):
        kill_writer.write_cache(str(out), 1, overwrite=False)
    assert lock.read_text() == "my own notes\n" and not out.exists()


def test_a_journal_never_reaches_outside_the_output_folder(tmp_path):
    """A lock file naming paths elsewhere (a forged or damaged journal) removes nothing."""
    (tmp_path / "keep.txt").write_text("x")
    folder = tmp_path / "run"
    folder.mkdir()
    out = folder / "c.zarr"
    lines = [
        {"side": "../keep.txt"},
        {"side": "/etc/hostname"},
        {"swap": {"src": "../keep.txt", "dst": "c.zarr", "old": "x", "then": ["../keep.txt"]}},
    ]
    lock_text = "kd-pipeline output lock\n" + "".join(json.dumps(e) + "\n" for e in lines)
    (folder / "c.zarr.lock").write_text(lock_text)
    with OutputLock(out):
        pass
    assert (tmp_path / "keep.txt").read_text() == "x"
    assert not (folder / "c.zarr.lock").exists()
