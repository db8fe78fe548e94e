"""Child processes of the tests (torchrun, dvc, kill tests): none outlives its call.

Every child runs in a session of its own and carries a tag in its environment that all its
descendants inherit. torchrun starts each rank in a new session of its own, and a rank whose
launcher died is re-parented to init, so neither the process group nor the process tree finds
every descendant; the tag does. When the call ends (done, failed or past its timeout), every
process still carrying its tag is killed, and `leftovers()` lets the session check, at its end,
that no tagged process survived.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

TAG_ENV = "KD_PIPELINE_TEST_CHILD"
SESSION = uuid.uuid4().hex[:12]  # tags of this test session start with it
# Generous for a loaded 2-core machine: the slowest call (a torchrun kill-and-resume) takes
# about 10 s idle. A hung child fails its test at this limit, and is killed.
TIMEOUT = 600


def run(
    cmd: list, *, timeout: float = TIMEOUT, env: dict | None = None, cwd=None
) -> subprocess.CompletedProcess:
    """`cmd` with text output captured, like `subprocess.run(..., capture_output=True,
    text=True)`, in a session of its own; every process it started is killed when it ends.
    Past `timeout` seconds the test fails with the child's output."""
    tag = f"{SESSION}-{uuid.uuid4().hex[:8]}"
    env = {**(os.environ if env is None else env), TAG_ENV: tag}
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} ran past {timeout} s and was killed with every process it "
            f"started\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}"
        ) from None
    except BaseException:
        kill_tagged(tag)
        proc.communicate()
        raise
    finally:
        kill_tagged(tag)  # a rank or daemon that outlived the command
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tagged(prefix: str) -> list[int]:
    """Pids of the live processes whose environment has a tag starting with `prefix`."""
    wanted = f"{TAG_ENV}={prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z" and any(v.startswith(wanted) for v in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def kill_tagged(prefix: str) -> list[int]:
    """SIGKILL every live process tagged `prefix`...; returns their pids."""
    if not Path("/proc/self/environ").exists():  # not Linux: the session's group is all
        return []
    pids = _tagged(prefix)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while pids and _tagged(prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def leftovers() -> list[int]:
    """Processes started by this test session's `run` calls that are still alive."""
    if not Path("/proc/self/environ").exists():
        return []
    return _tagged(SESSION)
