"""Augmented views in the cache vs one raw view vs online KD, on digits with 10% labels. CPU.

One CNN teacher (params.yaml's) distils into the default student (mlp, hidden [256]) for the
same epochs, loss kd at T = 4, alpha 0.9, 10% labels, 10% of those held out, each arm with
student seeds 0, 1, 2 (the teacher and the caches are shared by the seeds):

    single     (a) the default cache: one raw view (V = 1, no augmentation)
    fixed-aug  (d) one augmented view per sample (V = 1 with the shift): the fixed targets
                   FKD warns about, the same shifted input every epoch
    views-8    (b) a cache of V shifted views; epoch e trains each sample on view
    views-16   (b)   (e + offset) mod V, the input regenerated from the stored seed;
    views-60   (b)   V = 60 = the epochs: no view is seen twice, as online
    online     (c) online KD: a fresh shifted view of every sample every epoch, the teacher
                   run on it at every step (what online tools do)

The online arm uses the package's own training loop (`fit_many`, the same optimizer,
schedule, batch order, held-out slice and labels mask as stage two), with the teacher's
logits computed on the fly instead of read from a cache (`OnlineTargets`); without
augmentation it ends with the weights of stage two on the raw cache, bit for bit (checked on
every run, 3 epochs, recorded in the JSON). Every student is
scored on the raw digits:test split, and on a shifted copy of it (one seeded shift per test
sample, the same for every student).

    python benchmarks/bench_views.py                  # full run (about 7 minutes on 2 cores)
    python benchmarks/bench_views.py --quick          # smoke run (about 1 minute)
    python benchmarks/bench_views.py --augment crop:pad=1

Prints a markdown table and writes JSON (default benchmarks/results/views.json) and, with
--plot, a figure. No accuracy or timing is asserted; the machine it ran on is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache import open_cache  # noqa: E402
from pipeline.core.config import PrecomputeConfig, TrainTeacherConfig  # noqa: E402
from pipeline.core.device import epoch_rng, seed_everything  # noqa: E402
from pipeline.core.training import TrainData, Trainee, fit_many, predict  # noqa: E402
from pipeline.data import holdout_mask, load_transfer_set, mask_labels  # noqa: E402
from pipeline.data.views import AugmentSpec, apply_views, view_seeds  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import load_checkpoint  # noqa: E402
from pipeline.student.losses import get_loss  # noqa: E402
from pipeline.student.students import TrainStudentConfig, checkpoint_of  # noqa: E402
from pipeline.student.targets import TargetBatch, Targets  # noqa: E402
from stages import precompute_logits, train_student, train_teacher  # noqa: E402

CPU = torch.device("cpu")
TRAIN, TEST = "digits:train", "digits:test"
CACHE_SEED = 0  # seeds the cached views (shared by every student seed)
ONLINE_SEED = 1000  # + the student seed: seeds the online arm's fresh views
TEST_SHIFT_SEED = 99  # seeds the one shift per test sample of the shifted test split


class OnlineTargets(Targets):
    """Teacher targets computed at every step, on a fresh view per sample and epoch.

    Row r at epoch e is view `view_seeds(seed, ids, epochs)[r, e]`: a different augmentation
    every epoch, never repeated, as an online recipe draws them; the batches come in the order
    `MemoryTargets` serves them (a seeded permutation per epoch), so the student sees the same
    rows in the same batches as from a cache."""

    mode = "online"
    stored_combine = "mean-logits"

    def __init__(
        self,
        teacher: torch.nn.Module,
        inputs: np.ndarray,
        sample_ids: np.ndarray,
        spec: AugmentSpec,
        seed: int,
        epochs: int,
        num_classes: int,
    ):
        self.teacher_model = teacher.eval()
        self.inputs, self.spec = inputs, spec  # (N, *shape) float32
        self.seeds = view_seeds(seed, sample_ids, epochs)  # (N, E) int64
        self.num_rows, self.num_views, self.num_classes = len(inputs), epochs, num_classes

    def epoch(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[np.ndarray, TargetBatch]]:
        order = epoch_rng(seed, epoch).permutation(self.num_rows)
        for start in range(0, self.num_rows, batch_size):
            rows = order[start : start + batch_size]
            seeds = self.seeds[rows, epoch]  # (B,)
            x = torch.from_numpy(apply_views(self.inputs[rows], seeds, self.spec))
            with torch.no_grad():  # as online KD recipes do: teacher in eval mode, no autograd
                logits = self.teacher_model(x)  # (B, C)
            yield rows, TargetBatch(logits, None, seeds)


def student_config(args: argparse.Namespace, seed: int) -> TrainStudentConfig:
    """params.yaml's student (train_student, students.mlp, losses.kd) at T = 4."""
    cfg = TrainStudentConfig(
        model="mlp",
        model_kwargs={"hidden": [256]},
        loss="kd",
        temperature=4.0,
        loss_settings={"alpha": 0.9},
        labeled_fraction=0.1,
        holdout=0.1,
        epochs=args.epochs,
        batch_size=64,
        optimizer="adamw",
        lr=0.002,
        schedule="cosine",
        threads=1,
        seed=seed,
        device="cpu",
    )
    cfg.validate()  # resolves loss_settings against the loss's declaration
    return cfg


def train_online(
    cfg: TrainStudentConfig, teacher_ckpt: Path, spec: AugmentSpec, out: Path
) -> torch.nn.Module:
    """Online KD: stage two's rows, labels mask, batches, loss, optimizer and schedule, with
    the teacher run on a fresh view of every batch (pipeline/student/distill.py `_train_group`)."""
    ts = load_transfer_set(TRAIN)
    held = holdout_mask(ts.labels, cfg.holdout, cfg.seed)  # (N,) never trained on
    labels = mask_labels(np.where(held, -1, ts.labels), cfg.labeled_fraction, cfg.seed)
    train = np.flatnonzero(~held)
    teacher, meta = load_checkpoint(teacher_ckpt)  # online tools load the teacher per run
    classes = int(meta["num_classes"])
    targets = OnlineTargets(
        teacher,
        ts.inputs[train],
        ts.sample_ids[train],
        spec,
        ONLINE_SEED + cfg.seed,
        cfg.epochs,
        classes,
    )
    heldout = (torch.from_numpy(ts.inputs[held]), torch.from_numpy(ts.labels[held]))
    augment = (lambda x, seeds: apply_views(x, seeds, spec)) if spec else None
    rows = TrainData(
        torch.from_numpy(ts.inputs[train]),
        torch.from_numpy(labels[train]),
        targets,
        heldout,
        augment,
    )
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)  # then the model, then the trainee: as `_trainee` does
    model = create_model(cfg.model, classes, ts.input_shape, **cfg.model_kwargs)
    loss = get_loss(cfg.loss).bind(cfg.temperature, cfg.loss_settings)
    trainee = Trainee(out.name, model, loss, cfg, teacher=lambda batch: batch.logits)
    fit_many(
        [trainee],
        rows,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=CPU,
        desc=out.name,
    )
    return model


def check_online(args: argparse.Namespace, teacher_ckpt: Path, cache: Path, work: Path) -> float:
    """The online arm without augmentation against stage two on the raw cache, 3 epochs:
    the largest weight difference (0.0: the same loop, batches and updates, bit for bit)."""
    cfg = student_config(argparse.Namespace(epochs=3), 0)
    model = train_online(cfg, teacher_ckpt, AugmentSpec(), work / "check-online")
    train_student.run(cfg, cache, TRAIN, work / "check-cache")
    cached, _ = load_checkpoint(checkpoint_of(work / "check-cache"))
    pairs = zip(model.state_dict().values(), cached.state_dict().values(), strict=True)
    return max(float((a - b).abs().max()) for a, b in pairs)


def accuracy(model: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, inputs, 512, CPU).argmax(1) == labels).mean())


def teacher_on_views(cache: Path, ts) -> float:
    """The teacher's top-1 against the train labels over every cached view (the targets the
    students learn from: a teacher trained on raw digits is less sure of shifted ones)."""
    with open_cache(cache) as c:
        logits = c.logits(c.rows_for(ts.sample_ids))  # (N, V, C)
    return float((logits.argmax(2) == ts.labels[:, None]).mean())


def view_cost(ts, spec: AugmentSpec, repeats: int = 5) -> float:
    """Microseconds per row to regenerate a view (`apply_views`), the best of `repeats`."""
    seeds = view_seeds(0, ts.sample_ids, 1)[:, 0]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        apply_views(ts.inputs, seeds, spec)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(ts)


def public(cfg: object) -> dict:
    """A config's fields, without its private bookkeeping (`_sources`)."""
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    spec = AugmentSpec.parse(args.augment)
    test = load_transfer_set(TEST)
    shift_seeds = view_seeds(TEST_SHIFT_SEED, test.sample_ids, 1)[:, 0]
    tests = {"raw": test.inputs, "shifted": apply_views(test.inputs, shift_seeds, spec)}

    start = time.perf_counter()
    teacher_cfg = TrainTeacherConfig(
        model="cnn",
        model_kwargs={"channels": [32, 64], "hidden": 128},
        epochs=args.teacher_epochs,
        batch_size=64,
        lr=0.002,
        seed=0,
        device="cpu",
    )
    teacher_ckpt = train_teacher.run(teacher_cfg, TRAIN, work / "teacher.pt")
    teacher_s = time.perf_counter() - start
    teacher, _ = load_checkpoint(teacher_ckpt)
    teacher_acc = {k: accuracy(teacher, x, test.labels) for k, x in tests.items()}
    print(f"teacher trained in {teacher_s:.0f} s: test top-1 {teacher_acc}", flush=True)

    train_ts = load_transfer_set(TRAIN)
    caches = {"single": (1, ""), "fixed-aug": (1, args.augment)}
    caches.update({f"views-{v}": (v, args.augment) for v in args.views})
    arms: dict[str, dict] = {}
    for name, (views, augment) in caches.items():
        start = time.perf_counter()
        cfg = PrecomputeConfig(views=views, augment=augment, seed=CACHE_SEED, device="cpu")
        cache = precompute_logits.run(cfg, [str(teacher_ckpt)], TRAIN, work / f"{name}.zarr")
        arms[name] = {
            "views": views,
            "augment": AugmentSpec.parse(augment).canonical,
            "cache": cache,
            "precompute_s": time.perf_counter() - start,
            "teacher_top1_on_views": teacher_on_views(cache, train_ts),
        }
    check = check_online(args, teacher_ckpt, arms["single"]["cache"], work)
    print(f"online arm, no augmentation, vs stage two: max weight difference {check}", flush=True)
    arms["online"] = {"views": "fresh per epoch", "augment": spec.canonical, "precompute_s": 0.0}

    for seed in args.seeds:
        for name, arm in arms.items():
            cfg = student_config(args, seed)
            out = work / f"{name}-s{seed}"
            start = time.perf_counter()
            if name == "online":
                model = train_online(cfg, teacher_ckpt, spec, out)
            else:
                train_student.run(cfg, arm["cache"], TRAIN, out)
                model, _ = load_checkpoint(checkpoint_of(out))
            seconds = time.perf_counter() - start
            arm.setdefault("train_s", []).append(seconds)
            for k, x in tests.items():
                arm.setdefault(f"top1_{k}", []).append(accuracy(model, x, test.labels))
            print(
                f"{name:>10} seed {seed}: top-1 {arm['top1_raw'][-1]:.4f} raw, "
                f"{arm['top1_shifted'][-1]:.4f} shifted ({seconds:.0f} s)",
                flush=True,
            )

    for arm in arms.values():
        arm.pop("cache", None)
        for key in ("top1_raw", "top1_shifted", "train_s"):
            arm[key + "_summary"] = summary(arm[key])
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
            "augment": spec.canonical,
            "teacher": {**public(teacher_cfg), "train_s": teacher_s, "test_top1": teacher_acc},
            "student": public(student_config(args, 0)),
            "seeds": args.seeds,
            "cache_seed": CACHE_SEED,
            "online_view_seed": f"{ONLINE_SEED} + student seed",
            "shifted_test": f"one view per test sample, seed {TEST_SHIFT_SEED}, {spec.canonical}",
            "apply_views_us_per_row": view_cost(train_ts, spec),
            "online_vs_stage_two_max_weight_diff": check,
            "quick": args.quick,
        },
        "arms": arms,
    }


LABELS = {
    "single": "(a) one raw view (V = 1)",
    "fixed-aug": "(d) one shifted view (V = 1, fixed)",
    "online": "(c) online KD, fresh view each epoch",
}


def table(result: dict) -> str:
    """The markdown table: test top-1 mean ± std (min–max) and times, one row per arm."""
    rows = [
        "| arm | views | test top-1 % (raw) | min–max | top-1 % (shifted test) | "
        "teacher top-1 % on its views | precompute s | train s / student |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        raw, shifted = arm["top1_raw_summary"], arm["top1_shifted_summary"]
        label = LABELS.get(name, f"(b) cache of {arm['views']} shifted views")
        pre = f"{arm['precompute_s']:.1f}" if name != "online" else "–"
        on_views = arm.get("teacher_top1_on_views")
        teach = "–" if on_views is None else f"{100 * on_views:.2f}"
        rows.append(
            f"| {label} | {arm['views']} | {100 * raw['mean']:.2f} ± {100 * raw['std']:.2f} | "
            f"{100 * raw['min']:.2f}–{100 * raw['max']:.2f} | "
            f"{100 * shifted['mean']:.2f} ± {100 * shifted['std']:.2f} | {teach} | {pre} | "
            f"{arm['train_s_summary']['mean']:.1f} |"
        )
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, key in enumerate(("top1_raw", "top1_shifted")):
        for j, name in enumerate(names):
            values = 100 * np.array(result["arms"][name][key])
            x = j + (i - 0.5) * 0.3
            ax.bar(x, values.mean(), 0.3, color=f"C{i}", label=key[5:] if j == 0 else None)
            ax.plot([x] * len(values), values, "k.", ms=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test top-1 %")
    lows = [min(result["arms"][n]["top1_shifted"] + result["arms"][n]["top1_raw"]) for n in names]
    ax.set_ylim(100 * min(lows) - 2, 100)
    ax.legend(title="digits:test", loc="lower right")
    ax.set_title(f"mlp student, kd T=4, 10% labels, {result['setup']['augment']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 cache of views, 6 epochs.")
    parser.add_argument("--augment", default="shift:max=1", help="The views' augmentation.")
    parser.add_argument("--views", default="8,16,60", help="V of the (b) caches, comma-separated.")
    parser.add_argument("--epochs", type=int, default=60, help="Student epochs (params.yaml).")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2", help="Student seeds, comma-separated.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/views.json")
    parser.add_argument("--plot", type=Path, help="Also draw the accuracies to this PNG.")
    args = parser.parse_args()
    args.views = [int(v) for v in args.views.split(",") if v]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.seeds, args.views, args.epochs, args.teacher_epochs = (
            args.seeds[:1],
            args.views[:1],
            6,
            3,
        )
    if any(v < 2 for v in args.views):
        parser.error("--views: each V of a (b) cache must be >= 2")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    result["total_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)

    s = result["setup"]
    print(
        f"\nmlp [256] from a cnn teacher on {s['data']}, kd T=4 alpha 0.9, 10% labels, "
        f"{args.epochs} epochs, {s['augment']}, seeds {args.seeds}, {args.threads} thread(s); "
        f"teacher test top-1 {100 * s['teacher']['test_top1']['raw']:.2f} % raw, "
        f"{100 * s['teacher']['test_top1']['shifted']:.2f} % shifted "
        f"(trained in {s['teacher']['train_s']:.0f} s)\n"
    )
    print(table(result))
    print(f"\n{result['total_s']:.0f} s in all; written to {args.out}")


if __name__ == "__main__":
    main()
