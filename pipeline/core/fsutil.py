"""Writing artifacts so that a failure never leaves a half-written one or destroys a good one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.lock import (  # noqa: F401 (OutputLock: one import for writers)
    OutputLock,
    cannot_write,
    journal_for,
    kill_point,
    make_parent,
    recover_leftovers,
    remove,
)


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` was given, and one the file system will
    not let us create (under a file, in /proc, read-only): before any work, not after it."""
    out = Path(out)
    recover_leftovers(out)  # a killed run's side files, and its interrupted move into place
    if out.exists() and not overwrite:
        raise PipelineError(f"{out} already exists (pass --overwrite to replace it)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # created later; the first existing ancestor decides
    if not parent.is_dir():
        raise PipelineError(f"cannot write {out}: {parent} is not a directory")
    probe = temp_path(parent / out.name, "probe")
    try:
        with open(probe, "x"):
            pass
    except OSError as e:
        raise cannot_write(out, e) from None
    finally:
        if probe.exists():
            probe.unlink()


Inputs = dict[str, Path | None] | list[tuple[str, Path | None]]


def check_not_input(out: Path, inputs: Inputs, option: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of the run's inputs, whatever
    --overwrite says: writing it would destroy that input. `inputs`: {option: path} or
    (option, path) pairs (an option may repeat); a None path is skipped. Paths are resolved,
    symlinks followed."""
    pairs = inputs.items() if isinstance(inputs, dict) else inputs
    target = Path(out).expanduser().resolve()
    for name, path in pairs:
        if path is None or "://" in str(path):  # a URL (object storage) is no local input
            continue
        source = Path(path).expanduser().resolve()
        if target == source or _same_file(target, source):
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise PipelineError(
            f"{option} {out} {relation} the input {name} {path}: "
            "writing it would destroy that input; choose another output path"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths are one file (a hard link or a bind mount too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# Sources whose ARG names no file (`digits:train`): nothing on disk to protect.
NOT_A_PATH_SOURCES = ("digits",)
# Sources that, given the folder an archive unpacked into, read only this sub-folder of it
# (as `pipeline.data.cifar` does): an output beside it in that folder harms no input.
UNPACKED_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def data_path(spec: str) -> Path | None:
    """The local file or directory a `--data NAME:ARG[?options]` spec reads (ARG up to `?` or
    `#`), or None when it names none that exists."""
    name, sep, rest = spec.partition(":")
    if not sep or name in NOT_A_PATH_SOURCES:
        return None
    arg = rest.partition("?")[0].partition("#")[0]
    path = Path(arg).expanduser()
    if name in UNPACKED_FOLDERS and (path / UNPACKED_FOLDERS[name]).is_dir():
        path = path / UNPACKED_FOLDERS[name]
    return path if arg and path.exists() else None


def temp_path(out: Path, kind: str = "tmp") -> Path:
    """A fresh name beside `out` for this run alone (`OUT.tmp-1a2b3c4d`): a user's own
    `OUT.tmp` or `OUT.old` is never written over or deleted."""
    while True:
        path = out.with_name(f"{out.name}.{kind}-{secrets.token_hex(4)}")
        if not (path.exists() or path.is_symlink()):
            return path


def replace(
    src: Path,
    dst: Path,
    overwrite: bool = True,
    kept: str = "",
    then: tuple[Path, ...] = (),
    keep: bool = False,
    run: str | None = None,
) -> None:
    """Move a finished `src` to `dst`; an old `dst` is removed only once `src` is in place,
    then the paths `then`. Without `overwrite`, a `dst` that appeared since the run checked
    it (another run, a copy) is refused, not replaced; `kept` says where the finished work
    stays. The move is journaled in the lock held on `dst` (`pipeline.core.lock`), so a kill
    at any step is undone or completed by the next run; `keep` and `run` (a finished cache
    and its run's digest) leave an unmoved `src` to its writer."""
    if not overwrite and (dst.exists() or dst.is_symlink()):
        raise PipelineError(
            f"{dst} appeared while this run was writing it (another run, or a copy) and is not "
            f"replaced without --overwrite; {kept or 'nothing was written'}"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = temp_path(dst, "old")
    lock = journal_for(dst) if src.parent.absolute() == dst.parent.absolute() else None
    if lock is not None:
        swap = {"src": src.name, "dst": dst.name, "old": old.name, "then": [p.name for p in then]}
        swap.update(src_ino=_inode(src), old_ino=_inode(dst), keep=keep, run=run)
        lock.note({"swap": swap})
    kill_point("swap-journaled", dst)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
        kill_point("swap-aside", dst)
    os.replace(src, dst)
    kill_point("swap-moved", dst)
    remove(old)
    for path in then:
        remove(path)
    kill_point("swap-cleaned", dst)
    if lock is not None:
        lock.done(src)


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


@contextmanager
def atomic_output(out: str | Path, overwrite: bool, then: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it becomes `out` (and the paths `then`
    are removed), on error it is removed. Journaled in the lock held on `out` (or one taken
    here for the while), so a kill leaves nothing the next run does not clean up."""
    out = Path(out)
    check_writable(out, overwrite)
    own = OutputLock(out) if journal_for(out) is None else None
    if own is not None:
        own.acquire()
    try:
        with journaled_temp(out) as tmp:
            yield tmp
            replace(tmp, out, overwrite, then=then)
    finally:
        if own is not None:
            own.release()


@contextmanager
def journaled_temp(out: Path) -> Iterator[Path]:
    """A temporary name beside `out` for this run, journaled; removed on error."""
    tmp = temp_path(out)
    make_parent(out)
    lock = journal_for(out)
    if lock is not None:
        lock.side(tmp)
    try:
        yield tmp
    except OSError as e:
        remove(tmp)
        if e.filename is not None and Path(e.filename).name.startswith(tmp.name):
            raise cannot_write(out, e) from None
        raise
    except BaseException:
        remove(tmp)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_text(value: Any) -> str:
    """`value` as the JSON an artifact holds: indented, and never NaN or Infinity (which JSON
    does not have and strict readers refuse): a non-finite number becomes null."""
    return json.dumps(_finite(value), indent=2, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
