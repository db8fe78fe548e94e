"""Sparse targets (pipeline/cache/sparse.py): bytes per sample, and how far the KD loss and its
gradient are from the full-logit ones, for top-k and sampled targets at T = 1, 2, 4, 8.

Teacher: synthetic, C = 1000 classes, N = 2048 samples. Row n's logits by rank r = 1..C are
-a_n·ln r + 0.5·e (a power law over ranks; e standard normal per logit), with exponent
a_n = exp(N(ln 2.4, 0.3²)) per row (some rows confident, some ambiguous), then permuted at
random per row and shifted by a per-row offset ~ N(5, 2²) (raw logits are not normalised; the
offset exercises lse). The achieved median top-1 probability and entropy are printed.

Targets, built as stage one would (raw logits float32, indices int16, lse float32):
  top-k             `topk_targets` -> `topk_distribution` at T;
  top-k f16         the same with the values rounded to float16 (lse stays float32);
  sampled           K draws at proposal temperature Tp = 1 (`sample_targets`, ids 0..N-1),
                    counts alone at T = 1, the drawn classes' logits too at T != 1
                    (self-normalised importance sampling);
  sampled Tp=T      K draws at Tp = T, counts alone: what a cache drawn for that T gives.
Bytes are raw (before compression); sampled rows are padded to a fixed width K.

Students: "random" s ~ N(0, 1) per logit; "near" s = t + N(0, 0.5²) per logit. For each T,
the full loss is pipeline.student.losses' soft_kl, T²·KL(softmax(t/T) ‖ softmax(s/T)) (kd at
alpha = 1); the sparse one is `sparse_kd_loss` (the same term) on the rebuilt target.
Reported: the relative error of the loss; of its student-dependent part alone, the
cross-entropy T²·(-sum p log q) ("CE"; the rest, the target's entropy, is constant in the
student); and the angle between its gradient w.r.t. the student's logits (N·C, flattened)
and the full one, for one draw and ("mean8") for the gradient averaged over 8 independent
draws (seeds 0..7): what is left of the angle after averaging is bias (top-k is
deterministic: the same). A second table runs dkd and dist on `topk_logits` against the
same losses on the full logits.

    python benchmarks/bench_sparse.py   # 93 s of CPU; 134 s wall on 2 shared, busy cores

Prints tables and saves JSON (default benchmarks/results/sparse.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.cache.sparse import (  # noqa: E402
    sample_targets,
    sampled_distribution,
    sparse_kd_loss,
    take_values,
    topk_distribution,
    topk_logits,
    topk_targets,
)
from pipeline.student.losses import LOSSES, soft_kl  # noqa: E402

N, C = 2048, 1000
KS = (5, 10, 50, 100)
OTHER_KS = (10, 100)  # dkd and dist are slow to run: two K values
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
DRAWS = 8  # independent sampled draws averaged for the bias column
METHODS = ("top-k", "top-k f16", "sampled", "sampled Tp=T")


def make_teacher(seed: int = 0) -> np.ndarray:
    """Peaked raw logits (N, C) float32: a power law over ranks, permuted per row."""
    rng = np.random.default_rng(seed)
    exponent = np.exp(rng.normal(math.log(2.4), 0.3, N))  # (N,)
    ranks = np.log(np.arange(1, C + 1))  # (C,)
    by_rank = -exponent[:, None] * ranks + 0.5 * rng.standard_normal((N, C))  # (N, C)
    logits = rng.permuted(by_rank, axis=1) + rng.normal(5.0, 2.0, (N, 1))
    return logits.astype(np.float32)


def describe(logits: np.ndarray) -> dict:
    teacher = torch.from_numpy(logits).double()
    p = torch.softmax(teacher, 1)  # (N, C)
    entropy = -(p * p.log()).sum(1)  # (N,)
    top = p.sort(1, descending=True).values  # (N, C)
    mass = {}  # T -> K -> median probability mass of the top K classes at T
    for t in TEMPERATURES:
        top_t = torch.softmax(teacher / t, 1).sort(1, descending=True).values  # (N, C)
        mass[t] = {k: top_t[:, :k].sum(1).median().item() for k in KS}
    return {
        "median_top1_prob": top[:, 0].median().item(),
        "top1_prob_p10_p90": [top[:, 0].quantile(q).item() for q in (0.1, 0.9)],
        "median_entropy_nats": entropy.median().item(),
        "median_mass_in_top_k": mass,
    }


def bytes_per_sample(mean_distinct: dict[int, float]) -> list[dict]:
    rows = [
        {"method": "full float16", "k": C, "bytes": 2 * C},
        {"method": "full float32", "k": C, "bytes": 4 * C},
    ]
    for k in KS:
        rows += [
            {"method": "top-k f16 values + int16 idx + f32 lse", "k": k, "bytes": 4 * k + 4},
            {"method": "top-k f32 values + int16 idx + f32 lse", "k": k, "bytes": 6 * k + 4},
            {"method": "sampled int16 idx + uint8 counts (T = Tp)", "k": k, "bytes": 3 * k},
            {"method": "sampled + f16 values (any T)", "k": k, "bytes": 5 * k},
            {"method": "sampled + f32 values (any T)", "k": k, "bytes": 7 * k},
        ]
    for row in rows:
        if row["method"].startswith("sampled"):
            row["mean_distinct_classes"] = mean_distinct[row["k"]]
    return rows


def draw(logits: np.ndarray, k: int, proposal: float) -> list[tuple]:
    """DRAWS independent sampled targets (seeds 0..DRAWS-1): (indices, counts, values)."""
    out = []
    for seed in range(DRAWS):
        ids = np.arange(N)
        indices, counts = sample_targets(logits, k, seed, ids, proposal_temperature=proposal)
        out.append((indices, counts, take_values(logits, indices)))
    return out


def targets_at(t: float, k: int, topk: dict, sampled: dict) -> dict[str, list[torch.Tensor]]:
    """method -> its (N, C) targets at T: one for top-k, one per draw for sampled."""
    out = {"top-k": [topk_distribution(*topk[k], C, t)]}
    values, indices, lse = topk[k]
    values = values.astype(np.float16).astype(np.float32)  # as a float16 cache would hold them
    out["top-k f16"] = [topk_distribution(values, indices, lse, C, t)]
    out["sampled"] = [sampled_distribution(i, c, C, t, values=v) for i, c, v in sampled[k, 1.0]]
    if t != 1.0:  # drawn at the training temperature: counts alone, unbiased
        out["sampled Tp=T"] = [
            sampled_distribution(i, c, C, t, proposal_temperature=t) for i, c, _ in sampled[k, t]
        ]
    return out


def loss_and_grad(fn, student: torch.Tensor, *args, **kwargs) -> tuple[float, torch.Tensor]:
    """fn(student, *args, **kwargs) and its gradient w.r.t. the student's logits, flattened."""
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    loss.backward()
    return loss.item(), s.grad.double().flatten()


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two flattened gradients, in degrees."""
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(float(cos.clamp(-1, 1))))


def cross_entropy(student: torch.Tensor, target: torch.Tensor, t: float) -> float:
    """The student-dependent part of T²·KL: T²·mean over rows of -sum(target·log q)."""
    log_q = torch.log_softmax(student / t, 1)  # (N, C)
    return (t**2 * -(target * log_q).sum(1).mean()).item()


def kd_rows(logits: np.ndarray, students: dict, topk: dict, sampled: dict) -> list[dict]:
    teacher = torch.from_numpy(logits)
    rows = []
    for t in TEMPERATURES:
        dense = torch.softmax(teacher / t, 1)  # (N, C) the full target
        full = {name: loss_and_grad(soft_kl, s, teacher, t) for name, s in students.items()}
        ce = {name: cross_entropy(s, dense, t) for name, s in students.items()}
        for k in KS:
            for method, targets in targets_at(t, k, topk, sampled).items():
                mean = torch.stack(targets).mean(0)  # the gradient is linear in the target
                for name, s in students.items():
                    loss, grad = loss_and_grad(sparse_kd_loss, s, targets[0], temperature=t)
                    mean_grad = grad  # one target (top-k): its own mean
                    if len(targets) > 1:
                        _, mean_grad = loss_and_grad(sparse_kd_loss, s, mean, temperature=t)
                    ref_loss, ref_grad = full[name]
                    row = {"method": method, "k": k, "T": t, "student": name}
                    row["loss_rel_err"] = abs(loss - ref_loss) / ref_loss
                    row["ce_rel_err"] = abs(cross_entropy(s, targets[0], t) / ce[name] - 1)
                    row["grad_angle_deg"] = angle(grad, ref_grad)
                    row["mean_grad_angle_deg"] = angle(mean_grad, ref_grad)
                    rows.append(row)
    return rows


def other_loss_rows(logits: np.ndarray, students: dict, topk: dict) -> list[dict]:
    """dkd and dist (default settings, no labels: dkd's target class is the teacher's top-1)
    on `topk_logits` against the same loss on the full logits."""
    teacher, labels = torch.from_numpy(logits), torch.full((N,), -1)
    rows = []
    for loss in ("dkd", "dist"):
        spec = LOSSES[loss]
        settings = {key: setting.default for key, setting in spec.settings.items()}
        for t in TEMPERATURES:
            for name, s in students.items():
                ref_loss, ref_grad = loss_and_grad(
                    spec.fn, s, teacher, labels, temperature=t, **settings
                )
                for k in OTHER_KS:
                    z = topk_logits(*topk[k], C)  # (N, C) the tail filled with t_tail
                    got, grad = loss_and_grad(spec.fn, s, z, labels, temperature=t, **settings)
                    row = {"loss": loss, "k": k, "T": t, "student": name}
                    row["loss_rel_err"] = abs(got - ref_loss) / ref_loss
                    row["grad_angle_deg"] = angle(grad, ref_grad)
                    rows.append(row)
    return rows


def rounding_error(logits: np.ndarray, topk: dict) -> dict:
    """Largest T = 1 error of the kept probabilities and of the tail mass, with the values
    stored as float32 and as float16 (lse float32 in both)."""
    p = torch.softmax(torch.from_numpy(logits).double(), 1)  # (N, C)
    out = {}
    for k, (values, indices, lse) in topk.items():
        idx = torch.from_numpy(indices).long()
        true = p.gather(1, idx)  # (N, k)
        for dtype in ("float32", "float16"):
            stored = values.astype(dtype).astype(np.float32)
            kept = topk_distribution(stored, indices, lse, C, 1.0).double().gather(1, idx)
            out[f"k={k} {dtype}"] = {
                "max_rel_err_kept_prob": ((kept - true).abs() / true).max().item(),
                "max_abs_err_tail_mass": (kept.sum(1) - true.sum(1)).abs().max().item(),
            }
    return out


def print_tables(result: dict) -> None:
    t = result["teacher"]
    p10, p90 = t["top1_prob_p10_p90"]
    print(
        f"Teacher: C = {C}, N = {N}; top-1 probability median {t['median_top1_prob']:.3f} "
        f"(p10 {p10:.3f}, p90 {p90:.3f}); entropy median {t['median_entropy_nats']:.3f} nats"
    )
    for temp, by_k in t["median_mass_in_top_k"].items():
        mass = ", ".join(f"K={k}: {m:.4f}" for k, m in by_k.items())
        print(f"  median probability mass in the top K at T = {temp:g}: {mass}")
    print("\nBytes per sample (raw, before compression; sampled rows padded to width K)")
    print(f"{'method':<44}{'K':>6}{'bytes':>8}{'/ f16 full':>12}{'distinct':>10}")
    for r in result["bytes"]:
        distinct = f"{r['mean_distinct_classes']:.1f}" if "mean_distinct_classes" in r else ""
        ratio = r["bytes"] / (2 * C)
        print(f"{r['method']:<44}{r['k']:>6}{r['bytes']:>8}{ratio:>12.3f}{distinct:>10}")
    print("\nTop-k at T = 1: largest error of a kept probability (relative) and of the tail mass")
    for case, e in result["topk_rounding"].items():
        rel, tail = e["max_rel_err_kept_prob"], e["max_abs_err_tail_mass"]
        print(f"  {case:<14} kept {rel:.1e}   tail {tail:.1e}")
    print_kd_table(result["kd"])
    print_other_table(result["other_losses_topk"])


def print_kd_table(rows: list[dict]) -> None:
    print(
        "\nKD loss T²·KL(p_T ‖ q_T) from sparse targets vs full logits: relative error of the "
        "loss and of its CE part, gradient angle (degrees) for one draw and for the mean of 8"
    )
    cols = ("loss", "CE", "angle", "mean8")
    head = "".join(f"{c:>9}" for c in cols)
    print(f"{'':<13}{'':>5}{'':>4} {'random student':^36} {'near student':^36}")
    print(f"{'method':<13}{'K':>5}{'T':>4} {head} {head}")
    by_key = {(r["method"], r["k"], r["T"], r["student"]): r for r in rows}
    for method in METHODS:
        for k in KS:
            for temp in TEMPERATURES:
                if (method, k, temp, "random") not in by_key:
                    continue
                cells = ""
                for student in ("random", "near"):
                    r = by_key[(method, k, temp, student)]
                    cells += f" {r['loss_rel_err']:>9.1%}{r['ce_rel_err']:>9.2%}"
                    cells += f"{r['grad_angle_deg']:>9.1f}{r['mean_grad_angle_deg']:>9.1f}"
                print(f"{method:<13}{k:>5}{temp:>4g}{cells}")


def print_other_table(rows: list[dict]) -> None:
    print("\ndkd and dist on top-k logits vs full logits: loss relative error, gradient angle")
    print(f"{'loss':<6}{'K':>5}{'T':>4} {'random student':^20} {'near student':^20}")
    by_key = {(r["loss"], r["k"], r["T"], r["student"]): r for r in rows}
    for loss in ("dkd", "dist"):
        for k in OTHER_KS:
            for temp in TEMPERATURES:
                cells = ""
                for student in ("random", "near"):
                    r = by_key[(loss, k, temp, student)]
                    cells += f" {r['loss_rel_err']:>10.1%}{r['grad_angle_deg']:>9.1f}°"
                print(f"{loss:<6}{k:>5}{temp:>4g}{cells}")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min_at_start": os.getloadavg()[0],  # other jobs slow the run down
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    out = ROOT / "benchmarks/results/sparse.json"
    ap.add_argument("--out", type=Path, default=out, help="JSON output.")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    logits = make_teacher()
    teacher = torch.from_numpy(logits)
    students = {"random": torch.randn(N, C), "near": teacher + 0.5 * torch.randn(N, C)}
    topk = {k: topk_targets(logits, k) for k in KS}
    sampled = {(k, tp): draw(logits, k, tp) for k in KS for tp in TEMPERATURES}
    distinct = {
        k: float(np.mean([(c > 0).sum(1).mean() for _, c, _ in sampled[k, 1.0]])) for k in KS
    }
    result = {
        "machine": machine(),
        "teacher": {"classes": C, "samples": N, **describe(logits)},
        "draws": DRAWS,
        "bytes": bytes_per_sample(distinct),
        "topk_rounding": rounding_error(logits, topk),
    }
    seconds = {"targets": time.perf_counter() - start}
    result["kd"] = kd_rows(logits, students, topk, sampled)
    seconds["kd"] = time.perf_counter() - start - sum(seconds.values())
    result["other_losses_topk"] = other_loss_rows(logits, students, topk)
    seconds["other_losses"] = time.perf_counter() - start - sum(seconds.values())
    result["seconds"] = {"total": time.perf_counter() - start, **seconds}
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['seconds']['total']:.0f} s; saved {args.out}")


if __name__ == "__main__":
    main()
