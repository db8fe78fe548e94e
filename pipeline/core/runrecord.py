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
import hashlib
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
    bits of its floats): CPU model and architecture, torch's kernel set, cores, versions."""
    import torch

    return {
        "cpu_model": _cpu_model(),
        "cpu": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_record(
    out: str | Path, facts: dict[str, Any], identity: Path | None = None, cache: str | None = None
) -> Path:
    """Write `facts`, the time and the machine's facts to `out`'s run record (whole, or not
    at all). `identity`: the file whose sha256 names the artifact the record is of, so that
    a record left beside another artifact (after `dvc checkout`) is seen not to match it;
    `cache`: for a cache, its identity (`layout.cache_identity`, which covers every stored
    byte) instead of a file's sha256."""
    from pipeline.core.fsutil import atomic_output, json_text

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {**facts, "finished_at": now, "machine": machine()}
    if identity is not None:
        record["of"] = {"file": str(identity), "sha256": _sha256(identity)}
    if cache is not None:
        record["of"] = {"cache": str(out), "identity": cache}
    path = record_path(out)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json_text(record))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(out: str | Path) -> dict[str, Any]:
    """The run record of `out`; {} when there is none or it is unreadable (it is only ever
    informative: nothing downstream depends on it)."""
    try:
        value = json.loads(record_path(out).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
