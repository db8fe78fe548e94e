"""The lock of an output, and the journal of its side files, so a killed run leaves nothing.

A run that writes `OUT` holds an flock on `OUT.lock` while it works. The lock file is also
the run's journal: before the run creates a side file beside `OUT` (a temporary output
``OUT.tmp-<random>``, a training log) it appends a line naming it, and before it moves a
finished output into place it appends the move (`swap`: the new artifact, `OUT`, and the name
the old `OUT` is moved aside to). A run that ends well unlinks the lock file. A run killed at
any point (even by SIGKILL, which drops the flock) leaves the journal behind, and the next
run that takes the lock, or checks `OUT` before writing it (`check_writable`), reads it and
finishes what the dead run left:

* a side file is removed;
* a move not begun is undone: the old `OUT` goes back if it was moved aside, the new artifact
  is removed (a finished cache is left to its writer instead, `keep`: resumed or published);
* a move done (the new artifact is `OUT`) is completed: the old `OUT` and the paths the run
  meant to remove after it (`then`) are removed.

Nothing is recognised by a name pattern: a side file is ours only if this journal names it
(a name the run drew at random), a moved artifact only if it has the inode the journal
recorded, and a lock file only if it starts with `MARK`; any other ``OUT.lock`` is refused,
never written over or deleted. Without fcntl (Windows) locking and journaling are no-ops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError

MARK = "kd-pipeline output lock\n"
# Test hook (tests/test_attack_bar.py, tests/cache/test_kill_points.py): "POINT:NAME" SIGKILLs
# this process at `kill_point` POINT of writing the output named NAME.
KILL_AT_ENV = "KD_PIPELINE_TEST_KILL_AT"

# Locks this process holds, by output path: what `journal_for` finds.
_HELD: dict[Path, OutputLock] = {}


class OutputLock:
    """An exclusive lock on `<out>.lock`, held while one process writes `out`.

    Two runs writing the same output would interleave their work; the second is refused
    instead. The lock is an flock, so the kernel drops it when its holder dies and a crashed
    run never blocks its own resume. `pending`: the journal's moves of finished caches left
    to the caller (`keep`), after `acquire`.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".lock")
        self._fd: int | None = None
        self.pending: list[dict[str, Any]] = []

    def acquire(self, wait_message: bool = True) -> bool:
        """Take the lock and recover what a dead holder left; False (with `wait_message`
        False) when another process holds it."""
        try:
            import fcntl
        except ImportError:
            return True
        make_parent(self.out)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise cannot_write(self.out, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not wait_message:
                    return False
                raise PipelineError(
                    f"{self.out} is being written by another process (lock {self.path}); "
                    "wait for it to finish or stop it"
                ) from None
            # A holder that released it may have unlinked the file we opened: lock the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:
            entries = self._read_journal()
            self.pending = recover(self.out.parent, entries)
            self._rewrite(self.pending)
        except BaseException:
            self._close(unlink=False)
            raise
        _HELD[self.out.absolute()] = self
        return True

    def _read_journal(self) -> list[dict[str, Any]]:
        """The dead holder's journal; refuses a lock file that is not ours."""
        with open(self._fd, "rb", closefd=False) as f:
            f.seek(0)
            text = f.read().decode("utf-8", "replace")
        if text and not text.startswith(MARK):
            raise PipelineError(
                f"{self.path} exists and is not a lock file of kd-pipeline; move or delete it "
                "(it is not deleted for you)"
            )
        entries = []
        for line in text[len(MARK) :].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the last line of a run killed while writing it
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (MARK + "".join(_line(e) for e in entries)).encode(), 0)
        os.fsync(self._fd)

    def note(self, entry: dict[str, Any]) -> None:
        """Append `entry` to the journal, on disk before the caller goes on."""
        if self._fd is None:
            return
        os.lseek(self._fd, 0, os.SEEK_END)
        os.write(self._fd, _line(entry).encode())
        os.fsync(self._fd)

    def side(self, path: Path) -> None:
        """Journal the side file `path` (beside `out`), before it is created."""
        self.note({"side": Path(path).name})

    def done(self, path: Path) -> None:
        """`path`'s side file or move needs no recovery any more."""
        self.note({"done": Path(path).name})

    def settle(self) -> None:
        """The caller has dealt with `pending`: the journal starts empty again."""
        self.pending = []
        if self._fd is not None:
            self._rewrite([])

    def release(self) -> None:
        """Drop the lock; the journal goes too unless moves are left to the next run."""
        if self._fd is None:
            return
        _HELD.pop(self.out.absolute(), None)
        self._close(unlink=not self.pending)

    def _close(self, unlink: bool) -> None:
        if unlink:
            try:
                os.unlink(self.path)  # while still held, so no other process locks it
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def kill_point(point: str, out: Path | str) -> None:
    """SIGKILL this process here when the test hook `KILL_AT_ENV` names `point` and `out`."""
    want = os.environ.get(KILL_AT_ENV)
    if want and want == f"{point}:{str(out).rstrip('/').rpartition('/')[2]}":
        os.kill(os.getpid(), signal.SIGKILL)


def journal_for(path: Path) -> OutputLock | None:
    """The lock this process holds whose output `path` is, or sits beside (``OUT.suffix``):
    where a side file or move of `path` is journaled. None: no such lock is held."""
    path = Path(path).absolute()
    best = None
    for out, lock in _HELD.items():
        if out.parent == path.parent and (
            path.name == out.name or path.name.startswith(out.name + ".")
        ):
            if best is None or len(out.name) > len(best.out.name):
                best = lock
    return best


def recover_leftovers(out: Path) -> None:
    """Finish what a killed run writing `out` left (see the module doc), unless a live run
    holds its lock; cheap when there is no lock file."""
    lock = OutputLock(out)
    if not (lock.path.exists() or lock.path.is_symlink()) or journal_for(out) is not None:
        return
    if lock.acquire(wait_message=False):
        lock.release()


def recover(folder: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Act on a dead run's journal `entries` (names in `folder`); returns the moves left to
    their owner (`keep`)."""
    inodes = {e["ino"][0]: e["ino"][1] for e in entries if _pair(e.get("ino"))}
    done = {e["done"] for e in entries if isinstance(e.get("done"), str)}
    pending = []
    for entry in entries:
        name = entry.get("side")
        if isinstance(name, str) and name not in done and _safe(name):
            _remove_ours(folder / name, inodes.get(name))
        swap = entry.get("swap")
        if isinstance(swap, dict) and swap.get("src") not in done and _valid_swap(swap):
            if _finish_swap(folder, swap):
                pending.append(entry)
    return pending


def _finish_swap(folder: Path, swap: dict[str, Any]) -> bool:
    """Undo or complete one interrupted move; True when it is left to its owner."""
    src, dst, old = (folder / swap[k] for k in ("src", "dst", "old"))
    moved = not _is_ours(src, swap.get("src_ino")) and _is_ours(dst, swap.get("src_ino"))
    if not moved and swap.get("keep") and _exists(src):
        return True
    if moved:
        _remove_ours(old, swap.get("old_ino"))
        for name in swap.get("then", []):
            if _safe(name):
                remove(folder / name)
    else:
        if not _exists(dst) and _is_ours(old, swap.get("old_ino")):
            os.replace(old, dst)
        _remove_ours(src, swap.get("src_ino"))
    return False


def _valid_swap(swap: dict[str, Any]) -> bool:
    names = [swap.get(k) for k in ("src", "dst", "old")] + list(swap.get("then") or [])
    return all(isinstance(n, str) and _safe(n) for n in names)


def _safe(name: str) -> bool:
    """A bare name in the output's folder (never a path elsewhere)."""
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name


def _pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _is_ours(path: Path, ino: int | None) -> bool:
    """Whether `path` exists and, where its inode was journaled, is that file."""
    try:
        found = os.lstat(path).st_ino
    except OSError:
        return False
    return ino is None or found == ino


def _remove_ours(path: Path, ino: int | None) -> None:
    if _is_ours(path, ino):
        remove(path)


def remove(path: Path) -> None:
    """Delete the file, link or folder at `path`, if any."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":")) + "\n"


def make_parent(out: Path) -> None:
    """Create the directory `out` goes in, or say in one line why it cannot be."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from None


def cannot_write(out: Path, e: OSError) -> PipelineError:
    """One line for an output the file system refuses (read-only, under a file, /proc...)."""
    return PipelineError(f"cannot write {out}: {e.strerror or type(e).__name__}")
