"""The summary of a sweep: one Markdown table of the teacher, the CE baselines and every
student, two PNG plots and the CSV data `dvc plots show` renders, and a small JSON of the
headline numbers (`summary_metrics`).

Inputs are evaluate results (`pipeline.metrics.evaluate_student`, metrics/*.json); a run is
named by its metrics file's stem (`run_name`).
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path
from typing import Any

from pipeline.config import SweepConfig
from pipeline.errors import PipelineError
from pipeline.losses import LOSSES
from pipeline.results import INFO_SUFFIX, info_path, join_result

TEMPERATURE_PNG = "accuracy_vs_temperature.png"
PARAMS_PNG = "accuracy_vs_params.png"
STUDENTS_CSV = "students.csv"  # every model, for accuracy vs parameters
TEMPERATURE_CSV = "temperature.csv"  # distilled students only, for accuracy vs temperature
TRAINING_CSV = "training.csv"  # every student's per-epoch log, for training curves

SETTING_SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ"}  # other settings: name=value
# An ECE is flagged when above ECE_EXTREME, or above ECE_FLOOR and ECE_TEACHER_RATIO times
# the teacher's (see `ece_is_extreme`).
ECE_EXTREME, ECE_FLOOR, ECE_TEACHER_RATIO = 0.15, 0.05, 3.0
ECE_FLAG = "⚠"
ECE_FOOTNOTE = (
    f"{ECE_FLAG} ECE above 15%, or above 5% and more than 3× the teacher's: the student's "
    "confidence is far from its accuracy; calibrate it before trusting its probabilities."
)
# Models of one size are spread sideways in the accuracy-vs-parameters plot, this many
# decades apart on its log x axis, at most DODGE_SPAN decades in all.
DODGE_DECADES, DODGE_SPAN = 0.02, 0.15
SUMMARY_DECIMALS = 5  # floats in the summary metrics JSON
# Colours of losses not in LOSSES (user losses), apart from the C0-C9 cycle the built-ins use.
USER_LOSS_COLORS = (
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#5254a3",
    "#8ca252",
    "#bd9e39",
    "#ad494a",
    "#a55194",
)

Result = dict[str, Any]  # one evaluate output


# Reading


def load_results(
    metrics_dir: Path, sweep: SweepConfig | None = None
) -> tuple[list[Result], list[str]]:
    """Every `*.json` evaluate output in `metrics_dir`: (those in `sweep`, or all when it is
    None; the student names of those left out)."""
    files = sorted(p for p in Path(metrics_dir).glob("*.json") if not p.name.endswith(INFO_SUFFIX))
    if not files:
        raise PipelineError(f"no metrics *.json files in {metrics_dir}")
    results, left_out = [], []
    for f in files:
        r = _read_result(f)
        if sweep is not None and not in_sweep(r, sweep):
            left_out.append(r["student"])
        else:
            results.append(r)
    if not results:
        raise PipelineError(f"no metrics in {metrics_dir} belong to the sweep in --params")
    return results, left_out


def _read_result(path: Path) -> Result:
    """An evaluate output: metrics file and sidecar (or one file, as written before), with
    its run name, the metrics file's stem (`run`)."""
    r = _read_json(path)
    sidecar = info_path(path)
    if sidecar.is_file():
        r = join_result(r, _read_json(sidecar))
    if "student" not in r or "teacher" not in r:
        raise PipelineError(f"{path}: not an evaluate output (no {sidecar.name} beside it?)")
    r["run"] = path.stem
    return r


def _read_json(path: Path) -> dict[str, Any]:
    try:
        r = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path}: not valid JSON (an evaluate output?)") from None
    if not isinstance(r, dict):
        raise PipelineError(f"{path}: not an evaluate output")
    return r


def in_sweep(r: Result, sweep: SweepConfig) -> bool:
    """Whether an evaluate output belongs to the sweep (stale metrics of a removed student,
    loss or temperature stay in metrics/ after params.yaml changes)."""
    if _student(r) not in sweep.students:
        return False
    if r["loss"] == "ce":
        return True
    return r["loss"] in sweep.losses and r["temperature"] in sweep.temperatures


# Markdown


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def format_settings(settings: dict[str, Any] | None) -> str:
    """Loss settings for the table: α/β/γ for alpha/beta/gamma, any other as name=value."""
    parts = []
    for name, value in (settings or {}).items():
        shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
        parts.append(f"{SETTING_SYMBOLS.get(name, name)}={shown}")
    return ", ".join(parts) or "–"


def _settings(r: Result) -> dict[str, Any] | None:
    """A result's loss settings; metrics files written before them hold `loss_weights`."""
    settings = r.get("loss_settings")
    return r.get("loss_weights") if settings is None else settings


def _latency(r: Result, batch: str) -> str:
    return _num((r.get("latency_ms_per_sample") or {}).get(batch), ".3g")  # 0.00044, not 0.0004


def run_name(r: Result) -> str:
    """A run's name: its metrics file's stem (metrics/mlp-kd-t2.json → mlp-kd-t2), unique in
    the metrics directory; a result built in code falls back on its student's name."""
    return r.get("run") or r["student"]


def _student(r: Result) -> str:
    """The sweep's name for a result's student: its preset, else its registry model."""
    return r.get("preset") or r["model"]


def _order(r: Result) -> tuple:
    """CE baselines first, then by preset, loss and temperature."""
    return (r["loss"] != "ce", _student(r), r["loss"], r.get("temperature") or 0)


def render(
    results: list[Result],
    left_out: list[str] = (),
    figure: tuple[list[int], str] | None = None,
) -> str:
    """The summary Markdown for a list of evaluate outputs; `figure`: (sample ids, relative
    path) of the dark-knowledge figure, if one was drawn."""
    lines = ["# Distillation summary", "", _intro(results[0]), "", *_table(results)]
    lines += ["", *_verdict(results), *_pivot(results)]
    if left_out:
        lines += ["", f"Not in the sweep, left out: {', '.join(sorted(left_out))}."]
    if figure is not None:
        ids, path = figure
        lines += [
            "",
            "## Dark knowledge",
            "",
            f"The test samples the teacher finds most ambiguous (ids {', '.join(map(str, ids))}),"
            " at T = 1, 4 and 8: how the teacher ranks the wrong classes is what soft targets "
            "teach and labels do not (`pipeline show-targets` draws any sample).",
            "",
            f"![teacher distributions at several temperatures]({path})",
        ]
    return "\n".join(lines) + "\n"


def _intro(first: Result) -> str:
    """The paragraph on the test data, where the teacher's figures come from, and latency."""
    return (
        f"Test data: `{first['data']}` ({first['num_samples']} samples). Teacher outputs come "
        "from the test-split cache; the teacher was not loaded. Latency: median CPU milliseconds "
        f"per sample at batch 1 and 256 on {first.get('latency_threads', '?')} thread(s)."
    )


def _table(results: list[Result]) -> list[str]:
    """The table: the teacher, then every student in `_order`."""
    header = [
        "| model | role | loss | T | weights | labelled | top-1 % | top-5 % | agreement % "
        "| KL(t‖s) | ECE % | params | size KiB | ms @1 | ms @256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[Any, list[Result]] = {}  # one teacher row per teacher, then its students
    for r in results:
        groups.setdefault(r["teacher"].get("fingerprint"), []).append(r)
    rows = []
    for group in groups.values():
        rows += [_teacher_row(group[0]), *(_student_row(r) for r in sorted(group, key=_order))]
    flagged = any(ece_is_extreme(r.get("ece"), r.get("teacher_ece")) for r in results)
    return [*header, *rows, *(["", ECE_FOOTNOTE] if flagged else [])]


def ece_is_extreme(ece: float | None, teacher_ece: float | None) -> bool:
    """Whether a student's ECE is flagged: above 15%, or above 5% and more than 3× the
    teacher's ECE (a teacher ECE unknown: the 15% rule alone)."""
    if ece is None:
        return False
    if ece > ECE_EXTREME:
        return True
    return teacher_ece is not None and ece > ECE_FLOOR and ece > ECE_TEACHER_RATIO * teacher_ece


def _ece_cell(r: Result) -> str:
    flag = f" {ECE_FLAG}" if ece_is_extreme(r.get("ece"), r.get("teacher_ece")) else ""
    return _pct(r.get("ece")) + flag


def _teacher_row(first: Result) -> str:
    teacher = first["teacher"]
    members = len(teacher["models"])
    combine = teacher.get("combine") or "?"
    role = f"teacher ({members} members, {combine})" if members > 1 else "teacher"
    return (
        f"| {'+'.join(teacher['models']) or 'teacher'} | {role} | – | – | – | 1.0 "
        f"| {_pct(first['teacher_accuracy'])} | {_pct(first.get('teacher_top5_accuracy'))} "
        f"| 100.00 | 0 | {_pct(first.get('teacher_ece'))} | {teacher['num_params']:,} "
        "| – | – | – |"
    )


def _student_row(r: Result) -> str:
    distils = r["loss"] != "ce"
    role = f"student `{r['student']}`" + (" (baseline)" if not distils else "")
    size = r.get("size_bytes")
    return (
        f"| {r['model']} | {role} | {r['loss']} "
        f"| {_num(r['temperature'], 'g') if distils else '–'} | {format_settings(_settings(r))} "
        f"| {r['labeled_fraction']} | {_pct(r['accuracy'])} "
        f"| {_pct(r.get('top5_accuracy'))} | {_pct(r['agreement'])} "
        f"| {r['kl_teacher_student']:.4f} | {_ece_cell(r)} | {r['num_params']:,} "
        f"| {_num(None if size is None else size / 1024, '.1f')} "
        f"| {_latency(r, '1')} | {_latency(r, '256')} |"
    )


def _best_pair(results: list[Result]) -> tuple[Result, Result] | None:
    """(best CE baseline, best distilled student) by test accuracy; None without either."""
    baselines = [r for r in results if r["loss"] == "ce" and r["accuracy"] is not None]
    distilled = [r for r in results if r["loss"] != "ce" and r["accuracy"] is not None]
    if not baselines or not distilled:
        return None
    return max(baselines, key=lambda r: r["accuracy"]), max(distilled, key=lambda r: r["accuracy"])


def _verdict(results: list[Result]) -> list[str]:
    """The best distilled student against the best CE baseline, in points of accuracy."""
    pair = _best_pair(results)
    if pair is None:
        return []
    base, best = pair
    gain = 100 * (best["accuracy"] - base["accuracy"])
    return [
        f"Best distilled student `{best['student']}` vs CE baseline `{base['student']}`: "
        f"{gain:+.2f} points of test accuracy."
    ]


def _pivot(results: list[Result]) -> list[str]:
    """Top-1 % per student setup × temperature, when there is more than one temperature.

    A setup is everything but the temperature: preset, loss, its settings, the labelled
    fraction and the teacher (a column of its own when there are several), so students that
    differ in any of them get rows of their own. Results that would still share a cell (the
    same setup trained twice) get more rows, named by their runs: no result is dropped.
    """
    distilled = [r for r in results if r["loss"] != "ce" and r["accuracy"] is not None]
    temps = sorted({r["temperature"] for r in distilled})
    if len(temps) < 2:
        return []
    rows = _pivot_rows(distilled)
    teachers = _teacher_names(distilled)
    with_teacher = len(teachers) > 1
    spread = {key for key, _ in rows if sum(k == key for k, _ in rows) > 1}
    cols = ["student", "loss", "weights", "labelled", *(["teacher"] * with_teacher)]
    cols += [f"T={t:g}" for t in temps]
    lines = ["", "Test top-1 % by temperature:", "", "| " + " | ".join(cols) + " |"]
    lines.append("|" + "---|" * len(cols))
    for key, cells in rows:
        r = next(iter(cells.values()))
        name = _student(r)
        if key in spread:
            name += " (" + ", ".join(f"`{run_name(c)}`" for c in cells.values()) + ")"
        teacher = f"{teachers[_teacher_key(r)]} | " if with_teacher else ""
        lines.append(
            f"| {name} | {r['loss']} | {format_settings(_settings(r))} "
            f"| {r['labeled_fraction']} | {teacher}"
            + " | ".join(_pct(cells[t]["accuracy"] if t in cells else None) for t in temps)
            + " |"
        )
    return lines


def _setup(r: Result) -> tuple[str, ...]:
    """Everything that makes a distilled student but its temperature, as sortable strings."""
    settings = format_settings(_settings(r))
    return (_student(r), r["loss"], settings, str(r["labeled_fraction"]), *_teacher_key(r))


def _teacher_key(r: Result) -> tuple[str, str]:
    """The teacher a student learnt from: its fingerprint (else its models) and combine."""
    teacher = r["teacher"]
    return (teacher.get("fingerprint") or "+".join(teacher["models"]), r.get("combine") or "")


def _pivot_rows(distilled: list[Result]) -> list[tuple[tuple[str, ...], dict[float, Result]]]:
    """(setup, {temperature: result}) rows; a result whose cell is taken opens another row."""
    rows: list[tuple[tuple[str, ...], dict[float, Result]]] = []
    for r in sorted(distilled, key=lambda r: (_setup(r), run_name(r))):
        key, t = _setup(r), r["temperature"]
        cells = next((c for k, c in rows if k == key and t not in c), None)
        if cells is None:
            cells = {}
            rows.append((key, cells))
        cells[t] = r
    return rows


def _teacher_names(distilled: list[Result]) -> dict[tuple[str, str], str]:
    """A short name per teacher: its models (`r56+r110`), then its combine rule when
    ensembles differ in it, then its fingerprint's start when two teachers share models."""
    firsts = {_teacher_key(r): r for r in distilled}
    names = {k: "+".join(r["teacher"]["models"]) or "teacher" for k, r in firsts.items()}
    if len({combine for _, combine in firsts}) > 1:
        names = {k: f"{n} ({k[1]})" if k[1] else n for k, n in names.items()}
    for k, n in list(names.items()):
        if list(names.values()).count(n) > 1:
            names[k] = f"{n} `{k[0][:8]}`"
    return names


# Summary metrics


def summary_metrics(results: list[Result]) -> dict[str, Any]:
    """The headline numbers, small and stable for `dvc exp show`: the teacher's accuracy
    (the first result's teacher, as in the plots), the best distilled student's gain over the
    best CE baseline in points (left out without either), and each run's accuracy and
    agreement by run name. Numbers only: an unmeasured one is left out; floats rounded."""

    def numbers(**values: float | None) -> dict[str, float]:
        return {k: round(v, SUMMARY_DECIMALS) for k, v in values.items() if v is not None}

    summary: dict[str, Any] = {"teacher": numbers(accuracy=results[0]["teacher_accuracy"])}
    pair = _best_pair(results)
    if pair is not None:
        base, best = pair
        summary["best_gain_points"] = round(
            100 * (best["accuracy"] - base["accuracy"]), SUMMARY_DECIMALS
        )
    summary["students"] = {
        run_name(r): numbers(accuracy=r["accuracy"], agreement=r["agreement"])
        for r in sorted(results, key=run_name)
    }
    return summary


# Plots


def loss_color(loss: str) -> str:
    """One colour per loss in every plot: built-in losses by their place in LOSSES, others
    (user losses) by a hash of the name, the same in every run."""
    if loss in LOSSES:
        return f"C{list(LOSSES).index(loss) % 10}"
    return USER_LOSS_COLORS[zlib.crc32(loss.encode()) % len(USER_LOSS_COLORS)]


def write_plots(results: list[Result], plots: Path) -> list[Path]:
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
        plots / TRAINING_CSV,
    ]


def _plot_temperature(plt, first: Result, students: list[Result], path: Path) -> None:
    """Accuracy against temperature, one line per (student, loss); baselines and teacher as
    horizontal lines."""
    distilled = [r for r in students if r["loss"] != "ce"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drew_lines = _temperature_lines(ax, distilled)
    _reference_lines(ax, [r for r in students if r["loss"] == "ce"], first["teacher_accuracy"])
    temps = sorted({r["temperature"] for r in distilled})
    if temps and min(temps) > 0 and max(temps) / min(temps) >= 4:
        ax.set_xscale("log", base=2)
    if temps:
        ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test top-1 accuracy %")
    ax.set_title(f"Test accuracy against temperature ({first['data']})")
    if drew_lines:
        ax.legend(title="loss", fontsize=8)
    _save(plt, fig, ax, path)


def _temperature_lines(ax, distilled: list[Result]) -> bool:
    """One line per (student, loss): colour by loss, line style by student. Whether any."""
    lines: dict[tuple[str, str], list[Result]] = {}
    for r in distilled:
        lines.setdefault((_student(r), r["loss"]), []).append(r)
    presets = sorted({student for student, _ in lines})
    for (student, loss), rows in sorted(lines.items()):
        rows.sort(key=lambda r: r["temperature"])
        ax.plot(
            [r["temperature"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            marker="o",
            color=loss_color(loss),
            ls=["-", "--", "-.", ":"][presets.index(student) % 4],
            label=f"{student}/{loss}" if len(presets) > 1 else loss,
        )
    return bool(lines)


def _reference_lines(ax, baselines: list[Result], teacher_acc: float | None) -> None:
    """The CE baselines (grey, dashed) and the teacher (black, dotted) as horizontal lines."""
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


def _plot_params(plt, first: Result, students: list[Result], path: Path) -> None:
    """Accuracy against parameter count, one colour per loss, the teacher included; models
    of one size are spread sideways (`params_positions`) so none hides another."""
    teacher_acc = first["teacher_accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = params_positions(students)
    for loss in sorted({r["loss"] for r in students}):
        rows = [(x, r) for x, r in zip(xs, students, strict=True) if r["loss"] == loss]
        ax.scatter(
            [x for x, _ in rows],
            [100 * r["accuracy"] for _, r in rows],
            marker="x" if loss == "ce" else "o",
            color=loss_color(loss),
            label=loss,
        )
    teacher_params = first["teacher"]["num_params"]
    if teacher_acc is not None and teacher_params:
        ax.scatter(
            [teacher_params], [100 * teacher_acc], marker="*", s=160, c="black", label="teacher"
        )
    ax.set_xscale("log")
    spread = len(set(xs)) > len({r["num_params"] for r in students})
    ax.set_xlabel("parameters" + (" (models of one size spread sideways)" if spread else ""))
    ax.set_ylabel("test top-1 accuracy %")
    ax.set_title("Test accuracy against model size")
    ax.legend(title="loss", fontsize=8)
    _save(plt, fig, ax, path)


def params_positions(students: list[Result]) -> list[float]:
    """Where each student is drawn on the accuracy-vs-parameters plot's log x axis: at its
    parameter count, except that models of one size are spread evenly around it, in `_order`
    (CE first, then by preset, loss and temperature), DODGE_DECADES apart (closer when many
    share a size, DODGE_SPAN decades in all at most). The CSV keeps the true counts."""
    xs = [float(r["num_params"]) for r in students]
    sizes: dict[float, list[int]] = {}
    for i, x in enumerate(xs):
        sizes.setdefault(x, []).append(i)
    for x, members in sizes.items():
        if len(members) < 2 or x <= 0:
            continue
        members.sort(key=lambda i: (_order(students[i]), run_name(students[i])))
        step = min(DODGE_DECADES, DODGE_SPAN / (len(members) - 1))
        middle = (len(members) - 1) / 2
        for k, i in enumerate(members):
            xs[i] = x * 10 ** ((k - middle) * step)
    return xs


def _save(plt, fig, ax, path: Path) -> None:
    """Grid, tight layout, write the PNG and free the figure."""
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# CSV data


def _write_plot_data(first: Result, students: list[Result], plots: Path) -> None:
    """The CSVs `dvc plots show` renders: every model (teacher first), and the distilled ones."""
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
            row[k] = None if row.get(k) is None else round(100 * row[k], 4)
    _write_csv(plots / STUDENTS_CSV, fields, rows)
    _write_csv(
        plots / TEMPERATURE_CSV, fields, [r for r in rows if r["loss"] not in ("ce", "teacher")]
    )
    _write_training_curves(students, plots / TRAINING_CSV)


def _write_training_curves(students: list[Result], path: Path) -> None:
    """Every student's per-epoch log in one long table (student, epoch, loss, held-out
    accuracy %, lr), for `dvc plots show`'s training curves; the log comes from the student
    through evaluate's sidecar."""
    fields = ["student", "epoch", "loss", "heldout_accuracy", "lr"]
    rows = []
    for r in sorted(students, key=_order):
        for row in r.get("training") or []:
            acc = row.get("heldout_accuracy")
            rows.append(
                {
                    "student": run_name(r),
                    "epoch": row["epoch"],
                    "loss": round(row["loss"], 6),
                    "heldout_accuracy": None if acc is None else round(100 * acc, 4),
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
