"""Writing artifacts so that a failure never leaves a half-written one or destroys a good one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` was given, and one the file system will
    not let us create (under a file, in /proc, read-only): before any work, not after it."""
    out = Path(out)
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


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def temp_path(out: Path, kind: str = "tmp") -> Path:
    """A fresh name beside `out` for this run alone (`OUT.tmp-1a2b3c4d`): a user's own
    `OUT.tmp` or `OUT.old` is never written over or deleted."""
    while True:
        path = out.with_name(f"{out.name}.{kind}-{secrets.token_hex(4)}")
        if not (path.exists() or path.is_symlink()):
            return path


def replace(src: Path, dst: Path, overwrite: bool = True, kept: str = "") -> None:
    """Move a finished `src` to `dst`; an old `dst` is removed only once `src` is in place.
    Without `overwrite`, a `dst` that appeared since the run checked it (another run, a copy)
    is refused, not replaced; `kept` says where the finished work stays."""
    if not overwrite and (dst.exists() or dst.is_symlink()):
        raise PipelineError(
            f"{dst} appeared while this run was writing it (another run, or a copy) and is not "
            f"replaced without --overwrite; {kept or 'nothing was written'}"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = temp_path(dst, "old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    remove(old)


@contextmanager
def atomic_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it becomes `out`, on error it is removed."""
    out = Path(out)
    check_writable(out, overwrite)
    tmp = temp_path(out)
    make_parent(out)
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
    try:
        replace(tmp, out, overwrite)
    except BaseException:
        remove(tmp)
        raise


def make_parent(out: Path) -> None:
    """Create the directory `out` goes in, or say in one line why it cannot be."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from None


def cannot_write(out: Path, e: OSError) -> PipelineError:
    """One line for an output the file system refuses (read-only, under a file, /proc...)."""
    return PipelineError(f"cannot write {out}: {e.strerror or type(e).__name__}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OutputLock:
    """An exclusive lock on `<out>.lock`, held while one process writes `out`.

    Two runs writing the same cache would interleave their shards; the second is refused
    instead. The lock is an flock, so the kernel drops it when its holder dies (even by
    SIGKILL) and a crashed run never blocks its own resume. Without fcntl (Windows) it is a
    no-op.
    """

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:
            return
        out = self.path.with_name(self.path.name[: -len(".lock")])
        make_parent(out)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise cannot_write(out, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PipelineError(
                    f"{out} is being written by another process (lock {self.path}); "
                    "wait for it to finish or stop it"
                ) from None
            # A holder that released it may have unlinked the file we opened: lock the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        remove(self.path)  # unlinked while still held, so no other process locks a stale file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
