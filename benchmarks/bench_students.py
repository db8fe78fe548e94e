"""Students from the cache vs the teacher online, and cache read throughput. CPU only.

ResNet-56 teacher → ResNet-20 students on synthetic 32x32 inputs (10 classes), through the
package's own code paths (precompute stage, target reading, the shared training loop):

1. step ratio: time per training step from the cache (offline KD) / per plain CE step;
2. online / offline: the same KD step with the teacher's forward run on every batch, as
   online tools do, divided by the offline step;
3. eight students: precompute once + eight offline students (one process: lockstep sweep,
   and one by one), against eight online students;
4. cache reads: rows/s loading a cache into memory and streaming it through the shuffle
   buffer, with the streaming peak memory on a cache 4x larger than the budget.

    python benchmarks/bench_students.py            # full run (about 10 minutes, 1 thread)
    python benchmarks/bench_students.py --quick    # smoke run (about 1 minute)
    python benchmarks/bench_students.py --threads 0   # torch's default threads (a quiet machine)

Prints a table and writes JSON (default benchmarks/results/students.json). No timing is
asserted anywhere; the machine it ran on is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import OptimConfig, PrecomputeConfig  # noqa: E402
from pipeline.core.training import TrainData, Trainee, fit_many  # noqa: E402
from pipeline.data import TransferSet, register_source  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import save_checkpoint  # noqa: E402
from pipeline.student.distill import train  # noqa: E402
from pipeline.student.losses import bind_loss, loss_settings  # noqa: E402
from pipeline.student.students import Student, TrainStudentConfig  # noqa: E402
from pipeline.student.targets import TargetBatch, format_size, open_targets  # noqa: E402
from stages import precompute_logits, train_student  # noqa: E402

CPU = torch.device("cpu")
SHAPE = (3, 32, 32)


@register_source("bench32")
def bench32(arg: str, opts: object = None) -> TransferSet:
    """Synthetic CIFAR-shaped data: `bench32:N` is N seeded rows (3, 32, 32), 10 classes."""
    n = int(arg)
    rng = np.random.default_rng(0)
    return TransferSet(
        spec=f"bench32:{arg}",
        inputs=rng.normal(size=(n, *SHAPE)).astype(np.float32),
        labels=rng.integers(0, 10, n),
        sample_ids=np.arange(n, dtype=np.int64),
    )


@register_source("benchrows")
def benchrows(arg: str, opts: object = None) -> TransferSet:
    """Rows for the read benchmark: `benchrows:N`, tiny inputs (1,) so targets dominate."""
    n = int(arg)
    rng = np.random.default_rng(1)
    return TransferSet(
        spec=f"benchrows:{arg}",
        inputs=rng.normal(size=(n, 1)).astype(np.float32),
        labels=rng.integers(0, 100, n),
        sample_ids=np.arange(n, dtype=np.int64),
    )


def save_model(path: Path, name: str, classes: int, shape: tuple[int, ...], **kwargs) -> Path:
    torch.manual_seed(0)
    model = create_model(name, classes, shape, **kwargs)
    meta = {
        "model": name,
        "model_kwargs": kwargs,
        "num_classes": classes,
        "input_shape": list(shape),
        "class_names": None,
    }
    return save_checkpoint(path, model.eval(), meta)


class OnlineTrainee(Trainee):
    """A KD student whose teacher runs on every batch (what online tools do)."""

    def __init__(self, teacher: torch.nn.Module, *args, **kwargs):
        super().__init__(*args, teacher=lambda batch: batch.logits, **kwargs)
        self.teacher_model = teacher.eval()

    def step(self, x, y, targets, steps_per_epoch, epochs):
        with torch.no_grad():  # as online KD recipes do: teacher in eval mode, no autograd
            logits = self.teacher_model(x)
        super().step(x, y, TargetBatch(logits), steps_per_epoch, epochs)


def timed_epoch(make, data: TrainData, batch_size: int) -> float:
    """Seconds per step of one epoch over `data` for the trainee `make()` returns."""
    trainee = make()
    steps = -(-len(data) // batch_size)
    start = time.perf_counter()
    fit_many([trainee], data, epochs=1, batch_size=batch_size, seed=0, device=CPU, desc="bench")
    return (time.perf_counter() - start) / steps


def step_ratios(work: Path, n: int, batch_size: int, repeats: int) -> dict:
    """Offline KD vs plain CE vs online KD, per training step, interleaved `repeats` times."""
    teacher_ckpt = save_model(work / "resnet56.pt", "resnet56", 10, SHAPE)
    cache = precompute_logits.run(
        PrecomputeConfig(), [str(teacher_ckpt)], f"bench32:{n}", work / "steps.zarr"
    )
    ts = bench32(str(n))
    targets, _ = open_targets(cache, ts)
    inputs, labels = torch.from_numpy(ts.inputs), torch.from_numpy(ts.labels)
    offline = TrainData(inputs, labels, targets)
    plain = TrainData(inputs, labels)
    teacher = create_model("resnet56", 10, SHAPE)
    teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True)["state_dict"])

    def make(kind):
        def build():
            torch.manual_seed(0)
            model = create_model("resnet20", 10, SHAPE)
            if kind == "ce":
                return Trainee("ce", model, bind_loss("ce", 1.0, {}), OptimConfig("sgd", 0.05))
            kd = bind_loss("kd", 4.0, loss_settings("kd"))
            if kind == "online":
                return OnlineTrainee(teacher, "online", model, kd, OptimConfig("sgd", 0.05))
            return Trainee(
                "kd",
                model,
                kd,
                OptimConfig("sgd", 0.05),
                teacher=lambda b: targets.teacher(b, "mean-logits", 4.0),
            )

        return build

    timed_epoch(make("ce"), plain, batch_size)  # warm-up: allocator, kernels, first-call costs
    times = {"ce": [], "offline": [], "online": []}
    for _ in range(repeats):
        times["ce"].append(timed_epoch(make("ce"), plain, batch_size))
        times["offline"].append(timed_epoch(make("offline"), offline, batch_size))
        times["online"].append(timed_epoch(make("online"), plain, batch_size))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rows": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "seconds_per_step": med,
        "all_seconds_per_step": times,
        "offline_over_ce": med["offline"] / med["ce"],
        "online_over_offline": med["online"] / med["offline"],
    }


def eight_students(work: Path, n: int, batch_size: int, epochs: int) -> dict:
    """Precompute once + 8 offline students, against 8 online students (KD/DKD x 4 T)."""
    grid = [(loss, t) for loss in ("kd", "dkd") for t in (1.0, 2.0, 4.0, 8.0)]
    teacher_ckpt = save_model(work / "resnet56.pt", "resnet56", 10, SHAPE)
    data = f"bench32:{n}"

    start = time.perf_counter()
    cache = precompute_logits.run(PrecomputeConfig(), [str(teacher_ckpt)], data, work / "c.zarr")
    precompute = time.perf_counter() - start

    def cfg(loss, t):
        return TrainStudentConfig(
            model="resnet20",
            loss=loss,
            temperature=t,
            epochs=epochs,
            batch_size=batch_size,
            optimizer="sgd",
            lr=0.05,
        )

    start = time.perf_counter()
    students = [Student(cfg(loss, t), work / f"sweep/{loss}-{t:g}") for loss, t in grid]
    train(students, cache, data)
    sweep = time.perf_counter() - start

    start = time.perf_counter()
    for loss, t in grid:
        train_student.run(cfg(loss, t), cache, data, work / f"solo/{loss}-{t:g}")
    solo = time.perf_counter() - start

    ts = bench32(str(n))
    plain = TrainData(torch.from_numpy(ts.inputs), torch.from_numpy(ts.labels))
    start = time.perf_counter()
    for loss, t in grid:
        teacher = create_model("resnet56", 10, SHAPE)  # online tools load the teacher per run
        teacher.load_state_dict(torch.load(teacher_ckpt, weights_only=True)["state_dict"])
        torch.manual_seed(0)
        model = create_model("resnet20", 10, SHAPE)
        trainee = OnlineTrainee(
            teacher,
            f"{loss}-{t:g}",
            model,
            bind_loss(loss, t, loss_settings(loss)),
            OptimConfig("sgd", 0.05),
        )
        fit_many([trainee], plain, epochs=epochs, batch_size=batch_size, seed=0, device=CPU)
    online = time.perf_counter() - start
    return {
        "students": [f"{loss}-T{t:g}" for loss, t in grid],
        "rows": n,
        "epochs": epochs,
        "batch_size": batch_size,
        "precompute_s": precompute,
        "offline_sweep_s": sweep,
        "offline_one_by_one_s": solo,
        "online_s": online,
        "offline_total_sweep_s": precompute + sweep,
        "offline_total_one_by_one_s": precompute + solo,
        "online_over_offline_sweep": online / (precompute + sweep),
        "online_over_offline_one_by_one": online / (precompute + solo),
    }


def cache_reads(work: Path, n: int, classes: int, chunk_rows: int = 0) -> dict:
    """rows/s in memory and streamed; streaming peak memory with a budget of 1/4 the cache."""
    teacher = save_model(work / "linear.pt", "mlp", classes, (1,), hidden=[])
    data = f"benchrows:{n}"
    cfg = PrecomputeConfig(batch_size=4096, chunk_rows=chunk_rows)
    cache = precompute_logits.run(cfg, [str(teacher)], data, work / "reads.zarr")
    ts = benchrows(str(n))
    ts.fingerprint()  # not part of reading: the data's own hash
    logits_bytes = n * classes * 4
    budget = logits_bytes // 4

    start = time.perf_counter()
    memory, _ = open_targets(cache, ts)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    rows = sum(len(r) for r, _ in memory.epoch(0, 256, 0))
    memory_epoch_s = time.perf_counter() - start
    del memory

    stream, _ = open_targets(cache, ts, budget=budget)
    assert stream.mode == "stream"
    tracemalloc.start()
    start = time.perf_counter()
    streamed = sum(len(r) for r, _ in stream.epoch(0, 256, 0))
    stream_s = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rows == streamed == n
    return {
        "rows": n,
        "classes": classes,
        "logits_bytes": logits_bytes,
        "cache_bytes_on_disk": sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file()),
        "shard_rows": stream.shard_rows,
        "memory_load_s": load_s,
        "memory_rows_per_s": n / (load_s + memory_epoch_s),
        "memory_load_rows_per_s": n / load_s,
        "stream_rows_per_s": n / stream_s,
        "stream_budget_bytes": budget,
        "stream_buffer_rows": stream.buffer_rows,
        "stream_peak_traced_bytes": peak,
        "stream_peak_over_budget": peak / budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes: a smoke run.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/students.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, several threads contending "
        "with other jobs slow small convolutions many times over; 0: torch's default).",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes = {"steps": (128, 64, 2), "eight": (128, 64, 1), "reads": (65_536, 100, 64)}
    else:
        sizes = {"steps": (1024, 64, 5), "eight": (1024, 64, 1), "reads": (524_288, 100)}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "a").mkdir()
        (work / "b").mkdir()
        (work / "c").mkdir()
        start = time.perf_counter()
        steps = step_ratios(work / "a", *sizes["steps"])
        print(f"step ratios measured ({time.perf_counter() - start:.0f} s)", flush=True)
        eight = eight_students(work / "b", *sizes["eight"])
        print(f"eight students measured ({time.perf_counter() - start:.0f} s)", flush=True)
        reads = cache_reads(work / "c", *sizes["reads"])
        print(f"cache reads measured ({time.perf_counter() - start:.0f} s)", flush=True)

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "note": "shared machine: other jobs may have run at the same time",
        },
        "quick": args.quick,
        "step_ratios": steps,
        "eight_students": eight,
        "cache_reads": reads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    s, e, r = steps["seconds_per_step"], eight, reads
    threads = torch.get_num_threads()
    print(f"ResNet-56 → ResNet-20, batch {steps['batch_size']}, CPU, {threads} threads")
    print(f"  plain CE step            {1000 * s['ce']:8.1f} ms")
    print(
        f"  offline KD step (cache)  {1000 * s['offline']:8.1f} ms   "
        f"offline / CE     = {steps['offline_over_ce']:.3f}  (target <= 1.05)"
    )
    print(
        f"  online KD step           {1000 * s['online']:8.1f} ms   "
        f"online / offline = {steps['online_over_offline']:.2f}   (target >= 1.8)"
    )
    print(f"8 students, {e['rows']} rows x {e['epochs']} epoch(s):")
    print(
        f"  offline: precompute {e['precompute_s']:.1f} s + sweep {e['offline_sweep_s']:.1f} s "
        f"= {e['offline_total_sweep_s']:.1f} s  (one by one: "
        f"{e['offline_total_one_by_one_s']:.1f} s)"
    )
    ratio = e["online_over_offline_sweep"]
    print(f"  online:  {e['online_s']:.1f} s  → {ratio:.2f}x the offline sweep")
    print(
        f"cache reads, {r['rows']:,} rows x {r['classes']} classes "
        f"({format_size(r['logits_bytes'])} of float32 logits):"
    )
    print(f"  in memory  {r['memory_rows_per_s']:,.0f} rows/s (load + one epoch)")
    print(
        f"  streaming  {r['stream_rows_per_s']:,.0f} rows/s, budget "
        f"{format_size(r['stream_budget_bytes'])}, "
        f"peak {format_size(r['stream_peak_traced_bytes'])}"
        f" ({r['stream_peak_over_budget']:.2f}x the budget)"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
