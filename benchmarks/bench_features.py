"""KD alone vs KD + one feature loss (AT, FitNets, NST, FSP, Sobolev) on digits, 10% labels. CPU.

One CNN teacher (params.yaml's: cnn, channels [32, 64], hidden 128, 30 epochs) distils into a
smaller CNN student (cnn, channels [8, 16], hidden 32) for the same epochs, loss kd at T = 4,
alpha 0.9, 10% labels, 10% of those held out, one CPU thread, each arm with student seeds
0, 1, 2. Every arm keeps the feature loss's declared default weight (`pipeline losses`):

    kd          the logit loss alone, from a cache of logits only
    at-5        + at:att5=5             AT on the second conv block's ReLU (8x8 maps)
    at-2+5      + at on layers 2 and 5  AT on both blocks, one term each (the paper sums layers)
    fitnet-5    + fitnet:hint=5         a learned 1x1 regressor from the student's 16 channels
                                        to the teacher's 64 (float16 hint)
    nst-5       + nst:hint=5            MMD² of the channels' maps, polynomial kernel d = 2
    sobolev     + sobolev:grad          the gradient of one seeded projection of
                                        softmax(logits / 4) w.r.t. the input (k = 1, t = 4)
    kd-wide     the logit loss alone, on the FSP student
    fsp-2,5     + fsp:g=2+5             the 32 x 64 FSP matrix between layers 2 and 5

FSP has no regressor: the student's layers must be as wide as the teacher's, so the FSP rows
use their own student (channels [32, 64], the teacher's conv widths, with a hidden layer of 32
instead of 128) and their own KD baseline `kd-wide`. An arm whose mean top-1 falls below its
baseline's by more than the two spreads (std) added, or whose loss is not finite, is run again
at a tenth of its weight (`ARM@w=W`), and both rows are reported.

Each arm reads a cache holding only the features it uses, precomputed from the same teacher,
so its precompute time and cache size are its own. Reported per arm: test top-1 on
digits:test (mean ± std and range over the seeds), the cache bytes per sample of each feature
node (as stored before compression, from the cache's `describe` as `pipeline inspect --json`
gives it, and on disk after zstd:3), and the training step time: student.json
the run record's `seconds` / (epochs × steps per epoch), which includes the per-epoch held-out pass;
also the held-out accuracy after epoch 5 (how fast each arm gets there).

    python benchmarks/bench_features.py              # full run (about 7 minutes on 2 cores)
    python benchmarks/bench_features.py --quick      # smoke run (under 1 minute, to a temp file)
    python benchmarks/bench_features.py --epochs 60

Prints a markdown table and writes JSON (default benchmarks/results/features.json). No
accuracy or timing is asserted; the machine it ran on is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache import open_cache  # noqa: E402
from pipeline.cache.reader import describe  # noqa: E402
from pipeline.core.config import PrecomputeConfig, TrainTeacherConfig  # noqa: E402
from pipeline.core.runrecord import read_record  # noqa: E402
from pipeline.core.training import predict  # noqa: E402
from pipeline.data import load_transfer_set  # noqa: E402
from pipeline.models.checkpoint import load_checkpoint  # noqa: E402
from pipeline.student.feature_losses import get_feature_loss  # noqa: E402
from pipeline.student.students import INFO, TrainStudentConfig, checkpoint_of  # noqa: E402
from stages import precompute_logits, train_student, train_teacher  # noqa: E402

CPU = torch.device("cpu")
TRAIN, TEST = "digits:train", "digits:test"
TEACHER = {"channels": [32, 64], "hidden": 128}  # params.yaml's train_teacher
SMALL = {"channels": [8, 16], "hidden": 32}
WIDE = {"channels": [32, 64], "hidden": 32}  # FSP: the teacher's conv widths, a smaller head
RESULTS = ROOT / "benchmarks/results/features.json"
RETRY_FACTOR = 0.1  # an arm that hurts is run again at this fraction of its weight
EARLY_EPOCH = 5  # held-out accuracy after this epoch shows how fast each arm converges

# The teacher's feature targets, by name (NAME=LAYER:KIND, pipeline/cache/features.py).
FEATURES = {
    "att2": "att2=2:attention",
    "att5": "att5=5:attention",
    "hint5": "hint5=5:hint",
    "g25": "g25=2,5:fsp",
    "grad": "grad=input:input-grad:k=1,t=4",
}


@dataclass
class Arm:
    name: str
    student: dict  # cnn model_kwargs
    terms: list[str] = field(default_factory=list)  # --feature-loss terms
    baseline: str = "kd"  # the KD arm it is compared with (same student)
    weight: float | None = None  # None: each term's declared default

    @property
    def features(self) -> list[str]:
        """The cache features its terms read (LOSS:FEATURE[=LAYER][:...])."""
        return sorted({t.split(":")[1].partition("=")[0] for t in self.terms})

    def feature_losses(self) -> list[str]:
        if self.weight is None:
            return list(self.terms)
        return [f"{t}{',' if t.count(':') == 2 else ':'}weight={self.weight:g}" for t in self.terms]


ARMS = [
    Arm("kd", SMALL),
    Arm("at-5", SMALL, ["at:att5=5"]),
    Arm("at-2+5", SMALL, ["at:att2=2", "at:att5=5"]),
    Arm("fitnet-5", SMALL, ["fitnet:hint5=5"]),
    Arm("nst-5", SMALL, ["nst:hint5=5"]),
    Arm("sobolev", SMALL, ["sobolev:grad"]),
    Arm("kd-wide", WIDE, baseline="kd-wide"),
    Arm("fsp-2,5", WIDE, ["fsp:g25=2+5"], baseline="kd-wide"),
]


def student_config(arm: Arm, epochs: int, seed: int) -> TrainStudentConfig:
    """params.yaml's train_student and losses.kd at T = 4, on a cnn student, one thread."""
    cfg = TrainStudentConfig(
        model="cnn",
        model_kwargs=dict(arm.student),
        loss="kd",
        temperature=4.0,
        loss_settings={"alpha": 0.9},
        labeled_fraction=0.1,
        holdout=0.1,
        epochs=epochs,
        batch_size=64,
        optimizer="adamw",
        lr=0.002,
        schedule="cosine",
        threads=1,
        seed=seed,
        device="cpu",
        feature_losses=arm.feature_losses(),
    )
    cfg.validate()  # resolves loss_settings and the feature terms against their declarations
    return cfg


def default_weight(term: str) -> float:
    return float(get_feature_loss(term.split(":")[0]).settings["weight"].default)


def node_bytes(cache: Path) -> dict[str, dict[str, float]]:
    """Bytes per sample of each node: as stored before compression, and on disk."""
    with open_cache(cache) as c:
        info = describe(c)
    out = {}
    for name, node in info["arrays"].items():
        files = [p for p in (cache / name).rglob("*") if p.is_file()]
        out[name] = {
            "shape": node["shape"][1:],
            "dtype": node["stored_dtype"],
            "bytes_per_sample": node["bytes_per_sample"],
            "disk_bytes_per_sample": sum(p.stat().st_size for p in files) / info["num_samples"],
        }
    return out


def precompute(teacher: Path, features: list[str], work: Path) -> dict:
    """A cache of the teacher's logits and these features: its path, time and node sizes."""
    name = "+".join(features) or "logits"
    start = time.perf_counter()
    cfg = PrecomputeConfig(features=[FEATURES[f] for f in features], device="cpu")
    cache = precompute_logits.run(cfg, [str(teacher)], TRAIN, work / f"{name}.zarr")
    seconds = time.perf_counter() - start
    nodes = node_bytes(cache)
    return {"path": cache, "features": features, "precompute_s": seconds, "nodes": nodes}


def accuracy(model: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, inputs, 512, CPU).argmax(1) == labels).mean())


def train_one(arm: Arm, cache: Path, epochs: int, seed: int, test, work: Path) -> dict:
    """One student: its test top-1, final loss and step time from student.json."""
    cfg = student_config(arm, epochs, seed)
    out = work / f"{arm.name}-s{seed}"
    train_student.run(cfg, cache, TRAIN, out)
    info = json.loads((out / INFO).read_text())
    run = read_record(out)  # time and threads: the run record beside the student
    model, _ = load_checkpoint(checkpoint_of(out))
    trained = info["data"]["num_rows"] - info["heldout_rows"]
    steps = epochs * math.ceil(trained / cfg.batch_size)
    return {
        "seed": seed,
        "top1": accuracy(model, test.inputs, test.labels),
        "heldout_accuracy": info["final"].get("heldout_accuracy"),
        "heldout_curve": [e.get("heldout_accuracy") for e in info["log"]],  # per epoch
        "final_loss": info["final"]["loss"],
        "train_s": run["seconds"],
        "steps": steps,
        "step_ms": 1000 * run["seconds"] / steps,
        "num_params": info["num_params"],
        "threads": run["threads"],
    }


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def hurts(arm: dict, base: dict) -> bool:
    """Below its baseline by more than the two spreads added, or a non-finite loss."""
    if not all(math.isfinite(r["final_loss"]) for r in arm["runs"]):
        return True
    a, b = arm["top1"], base["top1"]
    return a["mean"] < b["mean"] - (a["std"] + b["std"])


def run_arms(arms: list[Arm], caches: dict, args, test, work: Path, results: dict) -> None:
    """Train every arm × seed (seeds outermost, so machine load spreads over the arms)."""
    for seed in args.seeds:
        for arm in arms:
            cache = caches[tuple(arm.features)]
            start = time.perf_counter()
            r = train_one(arm, cache["path"], args.epochs, seed, test, work)
            entry = results.setdefault(
                arm.name,
                {
                    "student": arm.student,
                    "feature_losses": arm.feature_losses(),
                    "weights": [arm.weight or default_weight(t) for t in arm.terms],
                    "baseline": arm.baseline,
                    "cache": {k: v for k, v in cache.items() if k != "path"},
                    "runs": [],
                },
            )
            entry["runs"].append(r)
            print(
                f"{arm.name:>16} seed {seed}: top-1 {r['top1']:.4f}, loss {r['final_loss']:.4f}, "
                f"{r['step_ms']:.1f} ms/step ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    for arm in arms:
        entry = results[arm.name]
        for key in ("top1", "step_ms", "train_s"):
            entry[key] = summary([r[key] for r in entry["runs"]])
        early = min(EARLY_EPOCH, args.epochs)
        entry["heldout_early"] = summary([r["heldout_curve"][early - 1] for r in entry["runs"]])


def run(args: argparse.Namespace, work: Path) -> dict:
    total = time.perf_counter()
    torch.set_num_threads(args.threads)
    test = load_transfer_set(TEST)

    start = time.perf_counter()
    teacher_cfg = TrainTeacherConfig(
        model="cnn",
        model_kwargs=TEACHER,
        epochs=args.teacher_epochs,
        batch_size=64,
        lr=0.002,
        seed=0,
        device="cpu",
    )
    teacher_ckpt = train_teacher.run(teacher_cfg, TRAIN, work / "teacher.pt")
    teacher_s = time.perf_counter() - start
    teacher, meta = load_checkpoint(teacher_ckpt)
    teacher_top1 = accuracy(teacher, test.inputs, test.labels)
    print(f"teacher trained in {teacher_s:.0f} s: test top-1 {teacher_top1:.4f}", flush=True)

    caches = {}
    for arm in ARMS:
        key = tuple(arm.features)
        if key not in caches:
            caches[key] = precompute(teacher_ckpt, list(key), work)

    # One unrecorded epoch of every arm first: the first student of a process pays for
    # torch's lazy initialisation (measured: the first KD arm's step twice the second's).
    for arm in ARMS:
        cache = caches[tuple(arm.features)]["path"]
        train_student.run(student_config(arm, 1, 0), cache, TRAIN, work / f"warm-{arm.name}")

    results: dict[str, dict] = {}
    run_arms(ARMS, caches, args, test, work, results)
    retries = []
    for arm in ARMS:
        entry = results[arm.name]
        if arm.terms and hurts(entry, results[arm.baseline]):
            weight = RETRY_FACTOR * default_weight(arm.terms[0])
            retries.append(replace(arm, name=f"{arm.name}@w={weight:g}", weight=weight))
    if retries:
        print("below the KD baseline: again at a tenth of the weight:", [a.name for a in retries])
        run_arms(retries, caches, args, test, work, results)

    for entry in results.values():
        base = results[entry["baseline"]]
        entry["top1_delta_vs_baseline"] = entry["top1"]["mean"] - base["top1"]["mean"]
        # medians: one run slowed by another job on the machine moves a mean of three
        entry["step_ms_vs_baseline"] = entry["step_ms"]["median"] / base["step_ms"]["median"]
        entry["hurts"] = bool(entry["feature_losses"]) and hurts(entry, base)
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "note": "shared machine: other jobs may have run at the same time",
        },
        "setup": {
            "data": TRAIN,
            "test": TEST,
            "teacher": {
                "model": "cnn",
                "model_kwargs": TEACHER,
                "epochs": args.teacher_epochs,
                "num_params": meta.get("num_params"),
                "train_s": teacher_s,
                "test_top1": teacher_top1,
            },
            "student": {
                k: v
                for k, v in vars(student_config(ARMS[0], args.epochs, 0)).items()
                if not k.startswith("_") and k not in ("model_kwargs", "feature_losses", "seed")
            },
            "students": {"small": SMALL, "wide (FSP)": WIDE},
            "features": FEATURES,
            "seeds": args.seeds,
            "retry_rule": (
                f"mean top-1 below the baseline's by more than std(arm) + std(baseline), or a "
                f"non-finite loss: run again at {RETRY_FACTOR:g} x the default weight"
            ),
            "step_time": "the run record's seconds / (epochs x ceil(trained rows / batch))",
            "heldout_early_epoch": min(EARLY_EPOCH, args.epochs),
            "quick": args.quick,
            "total_s": time.perf_counter() - total,
        },
        "arms": results,
    }


def table(result: dict) -> str:
    """The markdown table: one row per arm."""
    rows = [
        "| arm | student (params) | feature losses (weight) | feature nodes: B/sample stored "
        "(on disk) | precompute s | test top-1 %, mean ± std | min–max | Δ vs its KD | "
        f"held-out % after epoch {result['setup']['heldout_early_epoch']} | "
        "ms / step, median (× its KD) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        top1, early = arm["top1"], arm["heldout_early"]
        nodes = [
            f"{k[len('features/') :]} {v['bytes_per_sample']:,} ({v['disk_bytes_per_sample']:,.0f})"
            for k, v in arm["cache"]["nodes"].items()
            if k.startswith("features/")
        ]
        kw = arm["student"]
        student = f"cnn {kw['channels']}, h {kw['hidden']} ({arm['runs'][0]['num_params']:,})"
        losses = ", ".join(
            f"{t.split(':')[0]}:{t.split(':')[1]} ({w:g})"
            for t, w in zip(arm["feature_losses"], arm["weights"], strict=True)
        )
        delta = "–" if not losses else f"{100 * arm['top1_delta_vs_baseline']:+.2f}"
        rows.append(
            f"| {name} | {student} | {losses or 'kd alone'} | {'; '.join(nodes) or '–'} | "
            f"{arm['cache']['precompute_s']:.1f} | "
            f"{100 * top1['mean']:.2f} ± {100 * top1['std']:.2f} | "
            f"{100 * top1['min']:.2f}–{100 * top1['max']:.2f} | {delta} | "
            f"{100 * early['mean']:.1f} ± {100 * early['std']:.1f} | "
            f"{arm['step_ms']['median']:.1f} (× {arm['step_ms_vs_baseline']:.2f}) |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, 3 teacher epochs.")
    parser.add_argument("--epochs", type=int, default=30, help="Student epochs, every arm.")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="params.yaml's.")
    parser.add_argument("--seeds", default="0,1,2", help="Student seeds, comma-separated.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process.")
    parser.add_argument("--out", type=Path, help="JSON results (default: " + str(RESULTS) + ").")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:  # a smoke run never overwrites the measured results
        args.seeds, args.epochs, args.teacher_epochs = args.seeds[:1], 3, 3
        args.out = args.out or Path(tempfile.gettempdir()) / "bench_features_quick.json"
    args.out = args.out or RESULTS
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    print(f"\n{result['setup']['total_s']:.0f} s in all; results written to {args.out}")


if __name__ == "__main__":
    main()
