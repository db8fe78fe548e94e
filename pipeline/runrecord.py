"""Run records: what a run measured rather than computed (wall time, CPU threads, latency,
the machine), kept beside an artifact in `<out>.run.json`, never inside it.

An artifact (teacher checkpoint, cache, student, metrics) is a function of its inputs, so the
same command on the same inputs writes the same bytes and DVC sees nothing new. A run record
is not: it differs from run to run, so DVC does not hash it (`*.run.json` in `.dvcignore`) and
git does not track it (`.gitignore`). The record of `models/teacher.pt` is
`models/teacher.pt.run.json`, of `students/kd` `students/kd.run.json`, of
`metrics/kd.json` `metrics/kd.run.json`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

SUFFIX = ".run.json"


def record_path(out: str | Path) -> Path:
    """Where the run record of the artifact `out` goes."""
    out = Path(out)
    name = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(name + SUFFIX)


def machine() -> dict[str, Any]:
    """The facts of this machine that change a run's speed (and, for CPU kernels, the last
    bits of its floats): CPU architecture, torch's kernel set, cores, versions."""
    import torch

    return {
        "cpu": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_record(out: str | Path, facts: dict[str, Any]) -> Path:
    """Write `facts`, the time and the machine's facts to `out`'s run record (whole, or not
    at all)."""
    from pipeline.fsutil import atomic_output

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {**facts, "finished_at": now, "machine": machine()}
    path = record_path(out)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(out: str | Path) -> dict[str, Any]:
    """The run record of `out`; {} when there is none or it is unreadable (it is only ever
    informative: nothing downstream depends on it)."""
    try:
        value = json.loads(record_path(out).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
