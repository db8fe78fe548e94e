"""Stage: one Markdown summary of the teacher, the CE baselines and every student, with plots.

Inputs are evaluate outputs (metrics/*.json). Outputs: the summary, and in a plots directory
two PNGs (test accuracy against temperature per loss; accuracy against parameter count) and
the CSV data `dvc plots show` renders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.config import SweepConfig
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output
from pipeline.losses import LOSSES

TEMPERATURE_PNG = "accuracy_vs_temperature.png"
PARAMS_PNG = "accuracy_vs_params.png"
STUDENTS_CSV = "students.csv"  # every model, for accuracy vs parameters
TEMPERATURE_CSV = "temperature.csv"  # distilled students only, for accuracy vs temperature


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _weights(r: dict[str, Any]) -> str:
    symbols = {"alpha": "α", "beta": "β", "gamma": "γ"}
    return ", ".join(f"{symbols[k]}={v:g}" for k, v in (r.get("loss_weights") or {}).items()) or "–"


def _latency(r: dict[str, Any], batch: str) -> str:
    return _num((r.get("latency_ms_per_sample") or {}).get(batch), ".4f")


def _student(r: dict[str, Any]) -> str:
    """The sweep's name for a result's student: its preset, else its registry model."""
    return r.get("preset") or r["model"]


def _order(r: dict[str, Any]) -> tuple:
    """CE baselines first, then by preset, loss and temperature."""
    return (r["loss"] != "ce", _student(r), r["loss"], r.get("temperature") or 0)


def render(results: list[dict[str, Any]], left_out: list[str] = ()) -> str:
    """The summary Markdown for a list of evaluate outputs."""
    first = results[0]
    teacher = first["teacher"]
    lines = [
        "# Distillation summary",
        "",
        f"Test data: `{first['data']}` ({first['num_samples']} samples). Teacher outputs come from "
        "the test-split cache; the teacher was not loaded. Latency: median CPU milliseconds per "
        f"sample at batch 1 and 256 on {first.get('latency_threads', '?')} thread(s).",
        "",
        "| model | role | loss | T | weights | labelled | top-1 % | top-5 % | agreement % "
        "| KL(t‖s) | ECE % | params | size KiB | ms @1 | ms @256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {'+'.join(teacher['models']) or 'teacher'} | teacher | – | – | – | 1.0 "
        f"| {_pct(first['teacher_accuracy'])} | {_pct(first.get('teacher_top5_accuracy'))} "
        f"| 100.00 | 0 | {_pct(first.get('teacher_ece'))} | {teacher['num_params']:,} "
        "| – | – | – |",
    ]
    for r in sorted(results, key=_order):
        distils = r["loss"] != "ce"
        role = f"student `{r['student']}`" + (" (baseline)" if not distils else "")
        size = r.get("size_bytes")
        lines.append(
            f"| {r['model']} | {role} | {r['loss']} "
            f"| {_num(r['temperature'], 'g') if distils else '–'} | {_weights(r)} "
            f"| {r['labeled_fraction']} | {_pct(r['accuracy'])} "
            f"| {_pct(r.get('top5_accuracy'))} | {_pct(r['agreement'])} "
            f"| {r['kl_teacher_student']:.4f} | {_pct(r.get('ece'))} | {r['num_params']:,} "
            f"| {_num(None if size is None else size / 1024, '.1f')} "
            f"| {_latency(r, '1')} | {_latency(r, '256')} |"
        )
    lines += ["", *_verdict(results), *_pivot(results)]
    if left_out:
        lines += ["", f"Not in the sweep, left out: {', '.join(sorted(left_out))}."]
    return "\n".join(lines) + "\n"


def _verdict(results: list[dict[str, Any]]) -> list[str]:
    baselines = [r for r in results if r["loss"] == "ce" and r["accuracy"] is not None]
    distilled = [r for r in results if r["loss"] != "ce" and r["accuracy"] is not None]
    if not baselines or not distilled:
        return []
    base = max(baselines, key=lambda r: r["accuracy"])
    best = max(distilled, key=lambda r: r["accuracy"])
    gain = 100 * (best["accuracy"] - base["accuracy"])
    return [
        f"Best distilled student `{best['student']}` vs CE baseline `{base['student']}`: "
        f"{gain:+.2f} points of test accuracy."
    ]


def _pivot(results: list[dict[str, Any]]) -> list[str]:
    """Top-1 % per (student, loss) × temperature, when there is more than one temperature."""
    distilled = [r for r in results if r["loss"] != "ce" and r["accuracy"] is not None]
    temps = sorted({r["temperature"] for r in distilled})
    if len(temps) < 2:
        return []
    cells: dict[tuple[str, str], dict[float, float]] = {}
    for r in distilled:
        cells.setdefault((_student(r), r["loss"]), {})[r["temperature"]] = r["accuracy"]
    lines = [
        "",
        "Test top-1 % by temperature:",
        "",
        "| student | loss | " + " | ".join(f"T={t:g}" for t in temps) + " |",
        "|---|---|" + "---|" * len(temps),
    ]
    for (student, loss), row in sorted(cells.items()):
        lines.append(
            f"| {student} | {loss} | " + " | ".join(_pct(row.get(t)) for t in temps) + " |"
        )
    return lines


def in_sweep(r: dict[str, Any], sweep: SweepConfig) -> bool:
    """Whether an evaluate output belongs to the sweep (stale metrics of a removed student,
    loss or temperature stay in metrics/ after params.yaml changes)."""
    if _student(r) not in sweep.students:
        return False
    if r["loss"] == "ce":
        return True
    return r["loss"] in sweep.losses and r["temperature"] in sweep.temperatures


def _color(loss: str) -> str:
    """One colour per loss in every plot."""
    return f"C{list(LOSSES).index(loss) % 10}" if loss in LOSSES else "C9"


def write_plots(results: list[dict[str, Any]], plots: Path) -> list[Path]:
    """The PNGs and the CSV data behind them, in directory `plots`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    students = [r for r in results if r["accuracy"] is not None]
    _plot_temperature(plt, results[0], students, plots / TEMPERATURE_PNG)
    _plot_params(plt, results[0], students, plots / PARAMS_PNG)
    _write_plot_data(results[0], students, plots)
    return [
        plots / TEMPERATURE_PNG,
        plots / PARAMS_PNG,
        plots / STUDENTS_CSV,
        plots / TEMPERATURE_CSV,
    ]


def _plot_temperature(plt, first: dict[str, Any], students: list[dict[str, Any]], path: Path):
    """Accuracy against temperature, one line per (student, loss); baselines and teacher as
    horizontal lines."""
    distilled = [r for r in students if r["loss"] != "ce"]
    baselines = [r for r in students if r["loss"] == "ce"]
    teacher_acc = first["teacher_accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in distilled:
        lines.setdefault((_student(r), r["loss"]), []).append(r)
    presets = sorted({student for student, _ in lines})
    for (student, loss), rows in sorted(lines.items()):
        rows.sort(key=lambda r: r["temperature"])
        ax.plot(
            [r["temperature"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            marker="o",
            color=_color(loss),
            ls=["-", "--", "-.", ":"][presets.index(student) % 4],
            label=f"{student}/{loss}" if len(presets) > 1 else loss,
        )
    for r in baselines:
        ax.axhline(100 * r["accuracy"], ls="--", c="grey", lw=1)
        ax.annotate(
            f"CE {r['student']}",
            (0.01, 100 * r["accuracy"]),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="bottom",
            color="grey",
        )
    if teacher_acc is not None:
        ax.axhline(100 * teacher_acc, ls=":", c="black", lw=1)
        ax.annotate(
            "teacher",
            (0.01, 100 * teacher_acc),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="bottom",
        )
    temps = sorted({r["temperature"] for r in distilled})
    if temps and min(temps) > 0 and max(temps) / min(temps) >= 4:
        ax.set_xscale("log", base=2)
    if temps:
        ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test top-1 accuracy %")
    ax.set_title(f"Test accuracy against temperature ({first['data']})")
    if lines:
        ax.legend(title="loss", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_params(plt, first: dict[str, Any], students: list[dict[str, Any]], path: Path):
    """Accuracy against parameter count, one colour per loss, the teacher included."""
    teacher_acc = first["teacher_accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for loss in sorted({r["loss"] for r in students}):
        rows = [r for r in students if r["loss"] == loss]
        ax.scatter(
            [r["num_params"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            marker="x" if loss == "ce" else "o",
            color=_color(loss),
            label=loss,
        )
    teacher_params = first["teacher"]["num_params"]
    if teacher_acc is not None and teacher_params:
        ax.scatter(
            [teacher_params], [100 * teacher_acc], marker="*", s=160, c="black", label="teacher"
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test top-1 accuracy %")
    ax.set_title("Test accuracy against model size")
    ax.legend(title="loss", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_plot_data(first: dict[str, Any], students: list[dict[str, Any]], plots: Path) -> None:
    """The CSVs `dvc plots show` renders: every model (teacher first), and the distilled ones."""
    teacher_acc = first["teacher_accuracy"]
    teacher_params = first["teacher"]["num_params"]
    fields = [
        "student",
        "model",
        "loss",
        "temperature",
        "accuracy",
        "top5_accuracy",
        "agreement",
        "ece",
        "num_params",
    ]
    rows = [{k: r.get(k) for k in fields} for r in sorted(students, key=_order)]
    rows.insert(
        0,
        {
            "student": "teacher",
            "model": "+".join(first["teacher"]["models"]),
            "loss": "teacher",
            "accuracy": teacher_acc,
            "top5_accuracy": first.get("teacher_top5_accuracy"),
            "agreement": 1.0,
            "ece": first.get("teacher_ece"),
            "num_params": teacher_params,
        },
    )
    for row in rows:
        for k in ("accuracy", "top5_accuracy", "agreement", "ece"):
            row[k] = None if row.get(k) is None else round(100 * row[k], 4)
    _write_csv(plots / STUDENTS_CSV, fields, rows)
    _write_csv(
        plots / TEMPERATURE_CSV, fields, [r for r in rows if r["loss"] not in ("ce", "teacher")]
    )


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def run(
    metrics_dir: Path,
    out: Path,
    plots: Path | None = None,
    sweep: SweepConfig | None = None,
) -> Path:
    """Read every `*.json` from `metrics_dir` (evaluate outputs) and write `out`.

    `plots`: also write the PNGs and CSVs there. `sweep`: leave out students not in it.
    """
    files = sorted(Path(metrics_dir).glob("*.json"))
    if not files:
        raise PipelineError(f"no metrics *.json files in {metrics_dir}")
    results, left_out = [], []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError:
            raise PipelineError(f"{f}: not valid JSON (an evaluate output?)") from None
        if not isinstance(r, dict) or "student" not in r or "teacher" not in r:
            raise PipelineError(f"{f}: not an evaluate output")
        if sweep is not None and not in_sweep(r, sweep):
            left_out.append(r["student"])
        else:
            results.append(r)
    if not results:
        raise PipelineError(f"no metrics in {metrics_dir} belong to the sweep in --params")
    if plots is not None:
        with atomic_output(plots, overwrite=True) as tmp:
            write_plots(results, tmp)
    with atomic_output(out, overwrite=True) as tmp:
        tmp.write_text(render(results, left_out))
    return Path(out)
