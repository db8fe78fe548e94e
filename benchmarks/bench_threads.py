"""How many CPU threads a student should train on: time per training step (forward, KD loss,
backward, AdamW step) at batch 64 for models of several sizes, on 1 thread and on every core.

The rule `pipeline.core.device.choose_threads` uses (1 thread below a parameter count, every core
above it) comes from this table: small models spend their step in per-op overhead that extra
threads only add to.

    python benchmarks/bench_threads.py             # about 1-2 minutes
    python benchmarks/bench_threads.py --quick     # fewer repeats

Prints a table and writes benchmarks/results/threads.json; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models import count_parameters, create_model  # noqa: E402
from pipeline.student.losses import bind_loss  # noqa: E402

# (model, kwargs, per-sample input shape): the README's digits student and teacher, and
# CIFAR-sized ResNets.
MODELS = [
    ("mlp", {"hidden": [256]}, (1, 8, 8)),
    ("cnn", {"channels": [32, 64], "hidden": 128}, (1, 8, 8)),
    ("resnet8", {}, (3, 32, 32)),
    ("resnet20", {}, (3, 32, 32)),
    ("resnet56", {}, (3, 32, 32)),
]


def step_ms(name: str, kwargs: dict, shape: tuple, threads: int, steps: int) -> float:
    """Median milliseconds per training step on `threads` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, 10, shape, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = bind_loss("kd", 4.0, {"alpha": 0.9})
    x, t, y = torch.randn(64, *shape), torch.randn(64, 10), torch.randint(0, 10, (64,))
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        start = time.perf_counter()
        loss = loss_fn(model(x), t, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/threads.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for name, kwargs, shape in MODELS:
        params = count_parameters(create_model(name, 10, shape, **kwargs))
        steps = 10 if args.quick or params > 500_000 else 40
        one = step_ms(name, kwargs, shape, 1, steps)
        every = step_ms(name, kwargs, shape, cores, steps)
        rows.append({"model": name, "params": params, "ms_1": one, f"ms_{cores}": every})
        print(f"{name:<9} {params:>10,} params  1 thread {one:8.2f} ms  "
              f"{cores} threads {every:8.2f} ms  ({one / every:.2f}x)", flush=True)  # fmt: skip
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
        "torch": torch.__version__,
        "batch": 64,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
