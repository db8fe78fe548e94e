"""Token-level distillation speed as whole processes on this machine's CPU: each measure is the
wall time of a separate command, start to exit (imports, loading, the work, writing).

- precompute: `pipeline precompute-logits --topk 32` against a process that loads the same
  teacher and data and runs the teacher's forward over the same batches, nothing else (the
  floor), for two teachers;
- training: `pipeline train-student --loss kl` from that cache against `--loss ce` (the same
  command, data and epochs: a plain CE loop that reads no teacher targets' loss), for three
  student sizes.

Each pair of commands runs `--repeats` times, interleaved (A B A B ...: this VM's speed drifts
by 30 % between minutes, so pairs share the drift); the ratio is of the medians, and every
time is saved.

Teachers are randomly initialised (speed does not depend on training): gpt_mini (834k
parameters at a 64-byte context) and a 6-layer, width-256 causal transformer (4.8M). Data:
pystdlib:train, 4,000
sequences of 64 bytes (252k tokens). Everything on 2 threads (`--threads 2`), batches of 64
sequences for the teacher, 32 for students, 2 epochs.

    python benchmarks/bench_lm_speed.py   # about 15 minutes on 2 cores (3 repeats)

Prints a table and saves JSON (default benchmarks/results/lm_speed.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models import count_parameters, create_model  # noqa: E402
from pipeline.models.checkpoint import save_checkpoint  # noqa: E402

DATA = "pystdlib:train?limit=4000&length=64"
TEACHERS = {
    "gpt_mini": ("gpt_mini", {}),
    "6x256": ("causal_transformer", {"layers": 6, "width": 256}),
}
STUDENTS = ("gpt_nano", "gpt_micro", "gpt_mini")
RAW = """
import sys, torch
from pipeline.data.sequences import load_sequences
from pipeline.models.checkpoint import load_checkpoint
torch.set_num_threads(2)
model, _ = load_checkpoint(sys.argv[1])
seqs = load_sequences(sys.argv[2])
with torch.inference_mode():
    for first in range(0, len(seqs), 64):
        model(torch.from_numpy(seqs.tokens[first : first + 64]).long())
"""


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def paired(a: list, b: list, repeats: int) -> tuple[list[float], list[float]]:
    """The times of commands `a` and `b`, each run `repeats` times, interleaved."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(timed(a))
        times[1].append(timed(b))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lm_speed.json")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each command (interleaved)")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "pipeline"]
    out: dict = {"data": DATA, "torch": torch.__version__, "repeats": args.repeats,
                 "teachers": {}, "students": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (model_name, kwargs) in TEACHERS.items():
            torch.manual_seed(0)
            model = create_model(model_name, 256, (64,), **kwargs)
            path = folder / f"{name}.pt"
            save_checkpoint(path, model, {"model": model_name, "model_kwargs": kwargs,
                                          "num_classes": 256, "input_shape": [64]})  # fmt: skip
            cache = folder / f"{name}.zarr"
            pre = [*cli, "precompute-logits", "--teacher", path, "--data", DATA, "--topk",
                   "32", "--batch-size", "64", "--threads", "2", "--out", cache,
                   "--overwrite"]  # fmt: skip
            raw, pre = paired([sys.executable, "-c", RAW, str(path), DATA], pre, args.repeats)
            r, p = statistics.median(raw), statistics.median(pre)
            out["teachers"][name] = {"params": count_parameters(model), "raw_process_s": raw,
                                     "precompute_process_s": pre, "ratio": r / p}  # fmt: skip
            print(f"teacher {name}: raw {r:.1f} s, precompute {p:.1f} s, ratio {r / p:.2f}",
                  flush=True)  # fmt: skip
        cache = folder / "6x256.zarr"
        for student in STUDENTS:
            base = [*cli, "train-student", "--cache", cache, "--data", DATA, "--student", student,
                    "--epochs", "2", "--batch-size", "32", "--threads", "2"]  # fmt: skip
            ce, kl = paired([*base, "--loss", "ce", "--out", folder / "ce", "--overwrite"],
                            [*base, "--loss", "kl", "--out", folder / "kl", "--overwrite"],
                            args.repeats)  # fmt: skip
            with torch.device("meta"):
                params = count_parameters(create_model(student, 256, (64,)))
            c, k = statistics.median(ce), statistics.median(kl)
            out["students"][student] = {"params": params, "ce_process_s": ce, "kl_process_s": kl,
                                        "ratio": c / k}  # fmt: skip
            print(f"student {student}: ce {c:.1f} s, kl {k:.1f} s, ratio {c / k:.2f}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
