"""train-teacher on the default (params.yaml's train_teacher section, digits:train) on an idle
machine and beside busy processes: wall time of the whole command, as a ratio to idle.

The goal (issue "Portable and deterministic"): beside one busy process the automatic thread
count is no slower than 1.3x its idle time. `--threads N` rows show what a fixed count does;
on a 2-core machine `--threads 2` was the automatic choice before (every core).

    python benchmarks/bench_load.py              # about 3-5 minutes on 2 cores
    python benchmarks/bench_load.py --repeats 1  # quicker, noisier

A busy process is a Python loop that never sleeps (one core's worth of load). Prints a table
and writes benchmarks/results/load.json; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"


def train_seconds(threads: int | None, workdir: Path) -> float:
    """Wall seconds of `pipeline train-teacher` on the default, start-up included."""
    cmd = [sys.executable, "-m", "pipeline", "train-teacher", "--params", str(ROOT / "params.yaml")]
    cmd += ["--data", "digits:train", "--out", str(workdir / "t.pt"), "--overwrite"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(threads: int | None, busy: int, repeats: int, workdir: Path) -> float:
    """Best of `repeats` runs with `busy` busy processes beside them."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        return min(train_seconds(threads, workdir) for _ in range(repeats))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/load.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (None, 1, cores):
            idle = measure(threads, 0, args.repeats, Path(tmp))
            loaded = measure(threads, 1, args.repeats, Path(tmp))
            name = "auto" if threads is None else str(threads)
            rows.append({"threads": name, "idle_s": idle, "one_busy_s": loaded,
                         "ratio": loaded / idle})  # fmt: skip
            print(f"--threads {name:<5} idle {idle:6.1f} s   one busy process {loaded:6.1f} s   "
                  f"ratio {loaded / idle:.2f}", flush=True)  # fmt: skip
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
        "command": "pipeline train-teacher --params params.yaml --data digits:train",
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
