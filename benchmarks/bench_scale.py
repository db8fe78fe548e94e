"""Precompute throughput against the teacher's own inference loop: 1 and 2 ranks, fp32 and bf16.

The teacher is a CIFAR ResNet-56 (random init, seeded) on N synthetic Gaussian 32x32 inputs (an
.npz). "Raw inference" is the loop a user would write: the inputs already in memory as tensors,
`model(x)` per batch under `torch.inference_mode()`, nothing stored; with bf16 the same loop
under `torch.autocast`. "Precompute" is the whole command, `pipeline precompute-logits`, run as
a fresh process (Python start, imports, data and teacher load, probe, fingerprint, writes,
digests, finish), alone or under `torchrun --nproc-per-node 2` (gloo on CPU, one intra-op
thread per rank as torchrun sets it), all with shards of 128 rows (a shard is the unit of a
rank's work: with the default layout's up to 16384 rows, these sizes would make one shard).
Each ratio is raw-inference time / precompute time, so 1.0 means the cache costs nothing on top
of inference and 0.5 means it takes twice as long. Runs alternate; the best of `--repeats` wall
times is kept (the least disturbed by other load).

    python benchmarks/bench_scale.py --samples 2048 --bf16-samples 512 --repeats 2  # README
    python benchmarks/bench_scale.py --quick      # smoke run

On a machine with a GPU, `--device cuda` times the same on it (raw inference on the GPU too).
Results go to benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import save_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 samples, one repeat.")
    ap.add_argument("--samples", type=int, default=None, help="Transfer-set size (default 8192).")
    ap.add_argument("--batch-size", type=int, default=256, help="Teacher batch size.")
    ap.add_argument("--bf16-samples", type=int, default=None, help="bf16 size (default N/8).")
    ap.add_argument("--repeats", type=int, default=None, help="Timed repeats (default 3).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda.")
    ap.add_argument(
        "--shard-rows", type=int, default=128,
        help="Rows per shard, the unit of a rank's work (the default layout's 16384 would "
        "give one shard, and one busy rank, at these sizes).",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    args = ap.parse_args()
    n = args.samples or (512 if args.quick else 8192)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # bf16 on a CPU without bf16 matrix units is emulated, about 14x slower than fp32
        # here: fewer samples keep it in minutes (each ratio compares equal sample counts).
        sizes = {"fp32": n, "bf16": args.bf16_samples or max(64, n // 8)}
        data, ckpt, model = {}, None, None
        for precision, size in sizes.items():
            data[precision], ckpt, model = synthetic_teacher(tmp / precision, size)
        rows = []
        for precision in ("fp32", "bf16"):
            x = np.load(data[precision])["x"]
            raw = best(repeats, lambda p=precision, x=x: raw_inference(model, x, args, p))
            for ranks in (1, 2):
                if ranks > 1 and args.device == "cuda" and torch.cuda.device_count() < ranks:
                    continue
                run = functools.partial(precompute, tmp, data[precision], ckpt, args, ranks)
                t = best(repeats, lambda run=run, p=precision: run(p))
                rows.append(row(sizes[precision], precision, ranks, raw, t))
                print(json.dumps(rows[-1]))
    result = {"machine": machine(args.device), "samples": sizes, "batch_size": args.batch_size,
              "repeats": repeats, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"saved {args.out}")


def synthetic_teacher(tmp: Path, n: int) -> tuple[Path, Path, torch.nn.Module]:
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = tmp / "synthetic32.npz"
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    np.savez(data, x=x, y=rng.integers(0, 10, n), ids=np.arange(n))
    torch.manual_seed(0)
    model = create_model("resnet56", 10, (3, 32, 32)).eval()
    meta = {"model": "resnet56", "model_kwargs": {}, "num_classes": 10, "input_shape": [3, 32, 32]}
    ckpt = tmp / "resnet56.pt"
    save_checkpoint(ckpt, model, meta)
    return data, ckpt, model


def raw_inference(model: torch.nn.Module, x: np.ndarray, args, precision: str) -> float:
    """Seconds for the plain loop: batches already tensors on the device, forward only."""
    device = torch.device(args.device)
    model = model.to(device)
    batches = [torch.from_numpy(x[s : s + args.batch_size]).to(device)
               for s in range(0, len(x), args.batch_size)]  # fmt: skip
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())  # fmt: skip
    with torch.inference_mode(), autocast:
        model(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for xb in batches:
            model(xb).float().cpu()
        sync(device)
    return time.perf_counter() - start


def precompute(tmp: Path, data: Path, ckpt: Path, args, ranks: int, precision: str) -> float:
    """Seconds for the whole command in a fresh process (or `ranks` under torchrun)."""
    out = tmp / f"c-{ranks}-{precision}-{time.monotonic_ns()}.zarr"
    cli = ["-m", "pipeline", "precompute-logits", "--teacher", str(ckpt), "--data",
           f"npz:{data}", "--out", str(out), "--batch-size", str(args.batch_size),
           "--device", args.device, "--precision", precision,
           "--chunk-rows", str(args.shard_rows), "--chunks-per-shard", "1"]  # fmt: skip
    cmd = [sys.executable, *cli]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ranks), *cli]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def best(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def row(n: int, precision: str, ranks: int, raw: float, t: float) -> dict:
    return {"precision": precision, "ranks": ranks, "raw_inference_s": round(raw, 2),
            "raw_samples_per_s": round(n / raw, 1), "precompute_s": round(t, 2),
            "precompute_samples_per_s": round(n / t, 1), "ratio": round(raw / t, 3)}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| precision | ranks | raw inference (samples/s) | precompute (samples/s) | ratio |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['precision']} | {r['ranks']} | {r['raw_samples_per_s']:.0f} | "
                     f"{r['precompute_samples_per_s']:.0f} | {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def machine(device: str) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device}  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    main()
