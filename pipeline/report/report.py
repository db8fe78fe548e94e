"""The summary of a sweep: one Markdown table of the teacher, the CE baselines and every
student, with the best one named (ties broken and said), and a small JSON of the headline
numbers (`summary_metrics`). Its plots and their CSV data: `pipeline.report.plots`.

Inputs are evaluate results (`pipeline.evaluate.metrics.evaluate_student`, metrics/*.json); a run is
named by its metrics file's stem (`run_name`), and in the headline numbers and the plots'
labels by a short name (`short_names`: `ce`, `kd@2`). Accuracy is a fraction everywhere but
in the Markdown, whose columns say %.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.core import runrecord
from pipeline.core.config import SweepConfig
from pipeline.core.errors import PipelineError
from pipeline.evaluate.results import INFO_SUFFIX, info_path, join_result

SETTING_SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ"}  # other settings: name=value
# An ECE is flagged when above ECE_EXTREME, or above ECE_FLOOR and ECE_TEACHER_RATIO times
# the teacher's (see `ece_is_extreme`).
ECE_EXTREME, ECE_FLOOR, ECE_TEACHER_RATIO = 0.15, 0.05, 3.0
ECE_FLAG = "⚠"
ECE_FOOTNOTE = (
    f"{ECE_FLAG} ECE above 15%, or above 5% and more than 3× the teacher's: the student's "
    "confidence is far from its accuracy; calibrate it before trusting its probabilities."
)
# Fractions in the summary metrics JSON: 3 decimals tell apart every count of a test set of
# up to 1,000 samples, and keep a value at 5 characters, so that `dvc exp show` fits the
# headline of the default sweep in 80 columns (README). Full precision: metrics/NAME.json.
SUMMARY_DECIMALS = 3
TIE_TOLERANCE = 1e-9  # accuracies are counts over one test set: equal, or apart by 1/N

Result = dict[str, Any]  # one evaluate output


# Reading


def load_results(
    metrics_dir: Path, sweep: SweepConfig | None = None
) -> tuple[list[Result], list[str]]:
    """Every `*.json` evaluate output in `metrics_dir`: (those in `sweep`, or all when it is
    None; the student names of those left out)."""
    sidecars = (INFO_SUFFIX, runrecord.SUFFIX)
    files = sorted(p for p in Path(metrics_dir).glob("*.json") if not p.name.endswith(sidecars))
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
    if "bits_per_token" in r:  # a language model's: none of the table's columns
        raise PipelineError(
            f"{path}: a language model's metrics (bits per token); report tables sample "
            "students: read language models' with `dvc metrics show` or the JSON itself"
        )
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


def _kflops(r: Result) -> str:
    flops = r.get("flops_per_sample")
    return _num(None if flops is None else flops / 1000, ".4g")


def run_name(r: Result) -> str:
    """A run's name: its metrics file's stem (metrics/mlp-kd-t2.json → mlp-kd-t2), unique in
    the metrics directory; a result built in code falls back on its student's name."""
    return r.get("run") or r["student"]


def short_names(results: list[Result]) -> dict[str, str]:
    """Run name → short name, for the summary metrics (`dvc exp show` columns) and plot
    labels: `ce` for a CE baseline, `LOSS@T` for a distilled student (`kd@2`: kd at T = 2),
    followed by `-PRESET` when the results hold several presets (`kd@2-mlp`). Runs that would
    still share a name (another alpha, teacher or seed) are followed by their run name."""
    several = len({_student(r) for r in results}) > 1

    def base(r: Result) -> str:
        name = "ce" if r["loss"] == "ce" else f"{r['loss']}@{_num(r['temperature'], 'g')}"
        return f"{name}-{_student(r)}" if several else name

    bases = [base(r) for r in results]
    return {
        run_name(r): b if bases.count(b) == 1 else f"{b}-{run_name(r)}"
        for r, b in zip(results, bases, strict=True)
    }


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
            " at T = 1, 4 and 8, beside their inputs when the data is images: how the teacher "
            "ranks the wrong classes is what soft targets teach and labels do not "
            "(`pipeline show-targets` draws any sample).",
            "",
            f"![teacher distributions at several temperatures]({path})",
        ]
    return "\n".join(lines) + "\n"


def _intro(first: Result) -> str:
    """The paragraph on the test data, where the teacher's figures come from, and cost."""
    return (
        f"Test data: `{first['data']}` ({first['num_samples']} samples). Teacher outputs come "
        "from the test-split cache; the teacher was not loaded. Cost: forward kFLOPs per "
        "sample (the same on every machine; measured CPU latency is in each evaluation's run "
        "record, metrics/NAME.run.json)."
    )


def _table(results: list[Result]) -> list[str]:
    """The table: the teacher, then every student in `_order`."""
    header = [
        "| model | role | loss | T | weights | labelled | top-1 % | top-5 % | agreement % "
        "| KL(t‖s) | ECE % | params | size KiB | kFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        "| – | – |"
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
        f"| {_num(None if size is None else size / 1024, '.1f')} | {_kflops(r)} |"
    )


def _best_pair(results: list[Result]) -> tuple[Result, Result, str | None] | None:
    """(best CE baseline, best distilled student, how a tie for best was broken, or None
    when there was none), both by `rank`; None without either."""
    baselines = [r for r in results if r["loss"] == "ce" and r["accuracy"] is not None]
    distilled = [r for r in results if r["loss"] != "ce" and r["accuracy"] is not None]
    if not baselines or not distilled:
        return None
    return rank(baselines)[0], *best_of(distilled)


def rank(results: list[Result]) -> list[Result]:
    """Best first: by test accuracy, then agreement with the teacher (the student that
    learnt the teacher best), then calibration (lower ECE: its confidence can be trusted),
    then run name. An unknown agreement or ECE ranks last among equals."""

    def key(r: Result) -> tuple:
        agreement, ece = r.get("agreement"), r.get("ece")
        return (
            -_tied(r["accuracy"]),
            math.inf if agreement is None else -_tied(agreement),
            math.inf if ece is None else _tied(ece),
            run_name(r),
        )

    return sorted(results, key=key)


def _tied(x: float) -> float:
    """`x` on a grid of TIE_TOLERANCE: what counts as a tie for `rank`."""
    return round(x / TIE_TOLERANCE) * TIE_TOLERANCE


def best_of(distilled: list[Result]) -> tuple[Result, str | None]:
    """The best distilled student by `rank`, and when several share its accuracy, a
    sentence on who tied and what broke the tie (None when nobody tied)."""
    ranked = rank(distilled)
    best = ranked[0]
    tied = [r for r in ranked if _tied(r["accuracy"]) == _tied(best["accuracy"])]
    if len(tied) == 1:
        return best, None
    note = f"It was a tie: {_names(tied)} share the best top-1 ({_pct(best['accuracy'])} %)."
    agreeing = [r for r in tied if _same(r.get("agreement"), best.get("agreement"))]
    if len(agreeing) == 1:
        return best, note + " Broken by agreement with the teacher: " + _against(
            best, tied, "agreement", "agrees on"
        )
    note += (
        f" Broken by agreement with the teacher, where {_names(agreeing)} tie again "
        f"({_pct(best.get('agreement'))} %), then by calibration"
    )
    calibrated = [r for r in agreeing if _same(r.get("ece"), best.get("ece"))]
    if len(calibrated) == 1:
        verb = "has the lower ECE," if len(agreeing) == 2 else "has the lowest ECE,"
        return best, note + ": " + _against(best, agreeing, "ece", verb)
    return best, note + (
        f", where {_names(calibrated)} tie once more (ECE {_pct(best.get('ece'))} %): "
        f"`{run_name(best)}` comes first by name."
    )


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _tied(a) == _tied(b)


def _names(results: list[Result]) -> str:
    """`a`, `b` and `c`, in run-name order."""
    names = sorted(f"`{run_name(r)}`" for r in results)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _against(best: Result, rivals: list[Result], key: str, verb: str) -> str:
    """'`best` VERB 98.06 % (`b` 97.50 %, `c` 97.22 %).' for metric `key`."""
    others = ", ".join(
        f"`{run_name(r)}` {_pct(r.get(key))} %"
        for r in sorted(rivals, key=run_name)
        if r is not best
    )
    return f"`{run_name(best)}` {verb} {_pct(best.get(key))} % ({others})."


def _verdict(results: list[Result]) -> list[str]:
    """The best distilled student against the best CE baseline, in points of accuracy, and
    how a tie for best was broken."""
    pair = _best_pair(results)
    if pair is None:
        return []
    base, best, tie = pair
    gain = 100 * (best["accuracy"] - base["accuracy"])
    line = (
        f"Best distilled student `{run_name(best)}` vs CE baseline `{run_name(base)}`: "
        f"{gain:+.2f} points of test accuracy."
    )
    if tie is not None:
        line += " " + tie
    if ece_is_extreme(best.get("ece"), best.get("teacher_ece")):
        line += f" Its ECE is flagged {ECE_FLAG} (see the note under the table)."
    return [line]


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
    """The headline numbers, flat and short so that `dvc exp show` fits them in 80 columns:
    `best` (the best distilled student's short name, by `rank`) and `gain` (its test
    accuracy minus the best CE baseline's; both left out without either), each run's test
    accuracy under its short name (`ce`, `kd@2`, `short_names`), the teacher's (`teacher`:
    the first result's teacher, as in the plots), and each run's agreement with the teacher
    (`agreement`, a group). Fractions with SUMMARY_DECIMALS decimals; an unmeasured number
    is left out."""

    def fraction(x: float | None) -> float | None:
        return None if x is None else round(x, SUMMARY_DECIMALS)

    names = short_names(results)
    ordered = sorted(results, key=lambda r: (_order(r), run_name(r)))
    summary: dict[str, Any] = {}
    pair = _best_pair(results)
    if pair is not None:
        base, best, _ = pair
        summary["best"] = names[run_name(best)]
        summary["gain"] = fraction(best["accuracy"] - base["accuracy"])
    summary |= {names[run_name(r)]: fraction(r["accuracy"]) for r in ordered}
    summary["teacher"] = fraction(results[0]["teacher_accuracy"])
    summary["agreement"] = {names[run_name(r)]: fraction(r["agreement"]) for r in ordered}
    summary = {k: v for k, v in summary.items() if v is not None}
    summary["agreement"] = {k: v for k, v in summary["agreement"].items() if v is not None}
    return summary
