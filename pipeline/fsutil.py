"""Writing artifacts so that a failure never leaves a half-written one or destroys a good one."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` was given."""
    if out.exists() and not overwrite:
        raise PipelineError(f"{out} already exists (pass --overwrite to replace it)")


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


def replace(src: Path, dst: Path) -> None:
    """Move a finished `src` to `dst`; an old `dst` is removed only once `src` is in place."""
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
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    replace(tmp, out)


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                out = self.path.with_name(self.path.name[: -len(".lock")])
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
