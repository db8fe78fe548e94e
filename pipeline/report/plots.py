"""The report's plots and the CSV data behind them (`dvc plots show` renders the CSVs): test
accuracy against temperature and against model size, and every student's training curves.
Drawn by `pipeline.report.figures`; named and ordered as the report's table
(`pipeline.report.report`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.report.figures import (
    Point,
    Series,
    loss_color,
    plot_params,
    plot_temperature,
    spread_positions,
)
from pipeline.report.report import (
    TIE_TOLERANCE,
    Result,
    _order,
    _student,
    run_name,
    short_names,
)

TEMPERATURE_PNG = "accuracy_vs_temperature.png"
PARAMS_PNG = "accuracy_vs_params.png"
STUDENTS_CSV = "students.csv"  # every model, for accuracy vs parameters
TEMPERATURE_CSV = "temperature.csv"  # distilled students only, for accuracy vs temperature
TRAINING_CSV = "training.csv"  # every student's per-epoch log, for training curves
# A marker is about this fraction of the accuracy plots' height: points closer than that in
# accuracy, at one size, would touch.
CLOSE_MARKERS = 0.045


# Plots


def write_plots(results: list[Result], plots: Path) -> list[Path]:
    """The PNGs and the CSV data behind them, in directory `plots`."""
    plots.mkdir(parents=True, exist_ok=True)
    students = [r for r in results if r["accuracy"] is not None]
    first, names = results[0], short_names(results)
    baselines = sorted((r for r in students if r["loss"] == "ce"), key=_order)
    references = [(names[run_name(r)], r["accuracy"]) for r in baselines]
    if first["teacher_accuracy"] is not None:
        references.append(("teacher", first["teacher_accuracy"]))
    plot_temperature(
        _temperature_series(students),
        references,
        f"Test accuracy against temperature ({first['data']})",
        plots / TEMPERATURE_PNG,
    )
    series, teacher = _params_series(first, students, names)
    spread = len({p.x for s in series for p in s.points}) > len({r["num_params"] for r in students})
    plot_params(series, teacher, "Test accuracy against model size", spread, plots / PARAMS_PNG)
    _write_plot_data(first, students, plots)
    return [
        plots / TEMPERATURE_PNG,
        plots / PARAMS_PNG,
        plots / STUDENTS_CSV,
        plots / TEMPERATURE_CSV,
        plots / TRAINING_CSV,
    ]


def _temperature_series(students: list[Result]) -> list[Series]:
    """One series per (preset, loss) of the distilled students, a line over temperature, its
    points spread sideways at each temperature (by preset and loss) and labelled with their
    accuracy; line style by preset, named by it too when there are several."""
    distilled = sorted((r for r in students if r["loss"] != "ce"), key=_order)
    presets = sorted({_student(r) for r in distilled})
    xs = spread_positions(
        [r["temperature"] for r in distilled], [(r["loss"], _student(r)) for r in distilled]
    )
    series: dict[tuple[str, str], Series] = {}
    for r, x in zip(distilled, xs, strict=True):
        preset, loss = _student(r), r["loss"]
        name = f"{preset}/{loss}" if len(presets) > 1 else loss
        s = series.setdefault(
            (preset, loss), Series(name, loss, line=True, dashes=presets.index(preset))
        )
        label, color = f"{r['accuracy']:.3f}", loss_color(loss)
        s.points.append(Point(x, r["accuracy"], label, r["temperature"], color))
    return list(series.values())


def _params_series(
    first: Result, students: list[Result], names: dict[str, str]
) -> tuple[list[Series], Point | None]:
    """(one series per loss, the teacher's point or None) for accuracy against parameters:
    models of one size spread sideways (`params_positions`), each labelled with its short
    name and accuracy."""
    xs = params_positions(students, first["teacher_accuracy"])
    series: dict[str, Series] = {}
    for r, x in sorted(zip(students, xs, strict=True), key=lambda rx: _order(rx[0])):
        label = f"{names[run_name(r)]} {r['accuracy']:.3f}"
        series.setdefault(r["loss"], Series(r["loss"], r["loss"])).points.append(
            Point(x, r["accuracy"], label, float(r["num_params"]), loss_color(r["loss"]))
        )
    acc, size = first["teacher_accuracy"], first["teacher"]["num_params"]
    teacher = None if acc is None or not size else Point(size, acc, f"teacher {acc:.3f}", size)
    return list(series.values()), teacher


def params_positions(students: list[Result], teacher_accuracy: float | None = None) -> list[float]:
    """Where each student is drawn on the accuracy-vs-parameters plot's log x axis: at its
    parameter count, except that models of one size whose markers would touch (accuracies
    less than CLOSE_MARKERS of the plot's height apart; the teacher's accuracy widens it)
    are spread evenly around it in `_order` (CE first, then by preset, loss and temperature;
    `figures.spread_positions`). The CSV keeps the true counts."""
    ys = [r["accuracy"] for r in students]
    heights = ys + ([] if teacher_accuracy is None else [teacher_accuracy])
    span = max(heights) - min(heights) if heights else 0.0
    keys = [(_order(r), run_name(r)) for r in students]
    sizes = [float(r["num_params"]) for r in students]
    return spread_positions(sizes, keys, ys, CLOSE_MARKERS * span or TIE_TOLERANCE)


# CSV data


def _write_plot_data(first: Result, students: list[Result], plots: Path) -> None:
    """The CSVs `dvc plots show` renders: every model (teacher first), and the distilled ones;
    accuracies as fractions, as in the metrics files."""
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
    rows.insert(0, _teacher_csv_row(first))
    for row in rows:
        for k in ("accuracy", "top5_accuracy", "agreement", "ece"):
            row[k] = None if row.get(k) is None else round(row[k], 6)
    _write_csv(plots / STUDENTS_CSV, fields, rows)
    _write_csv(
        plots / TEMPERATURE_CSV, fields, [r for r in rows if r["loss"] not in ("ce", "teacher")]
    )
    _write_training_curves(students, plots / TRAINING_CSV)


def _write_training_curves(students: list[Result], path: Path) -> None:
    """Every student's per-epoch log in one long table (student, its loss, epoch, training
    loss, that loss relative to its first epoch's, held-out accuracy as a fraction, lr), for
    `dvc plots show`'s training curves; the log comes from the student through evaluate's
    sidecar. Losses differ in scale (KD's KL, DKD's weighted terms, CE), so the plot draws the
    relative loss: every curve starts at 1 and shows how far its own loss came down."""
    fields = ["student", "loss_name", "epoch", "loss", "loss_relative", "heldout_accuracy", "lr"]
    rows = []
    for r in sorted(students, key=_order):
        log = sorted(r.get("training") or [], key=lambda row: row["epoch"])
        start = log[0]["loss"] if log else None
        for row in log:
            acc = row.get("heldout_accuracy")
            rows.append(
                {
                    "student": run_name(r),
                    "loss_name": r["loss"],
                    "epoch": row["epoch"],
                    "loss": round(row["loss"], 6),
                    "loss_relative": round(row["loss"] / start, 6) if start else None,
                    "heldout_accuracy": None if acc is None else round(acc, 6),
                    "lr": row.get("lr"),
                }
            )
    _write_csv(path, fields, rows)


def _teacher_csv_row(first: Result) -> dict[str, Any]:
    return {
        "student": "teacher",
        "model": "+".join(first["teacher"]["models"]),
        "loss": "teacher",
        "accuracy": first["teacher_accuracy"],
        "top5_accuracy": first.get("teacher_top5_accuracy"),
        "agreement": 1.0,
        "ece": first.get("teacher_ece"),
        "num_params": first["teacher"]["num_params"],
    }


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
