"""Report: the summary table, the sweep filter, and the plots people look at."""

import csv
import json

import pytest

from pipeline.report import figures, report
from pipeline.report import plots as report_plots
from pipeline.student.losses import LOSSES
from tests.conftest import invoke
from tests.test_cli_errors import assert_clean_error

PNG = b"\x89PNG\r\n\x1a\n"


def result(student, preset, loss, temperature, accuracy, params=1000):
    return {
        "student": student,
        "preset": preset,
        "model": "mlp",
        "num_params": params,
        "size_bytes": 4096,
        "loss": loss,
        "temperature": temperature,
        "loss_settings": {"alpha": 0.9} if loss == "kd" else {},
        "labeled_fraction": 0.1,
        "accuracy": accuracy,
        "top5_accuracy": 0.99,
        "teacher_accuracy": 0.98,
        "teacher_top5_accuracy": 1.0,
        "agreement": 0.95,
        "kl_teacher_student": 0.1,
        "ece": 0.05,
        "teacher_ece": 0.02,
        "num_samples": 360,
        "flops_per_sample": 2 * params,
        "teacher": {"models": ["cnn"], "num_params": 50000},
        "data": "digits:test",
    }


def old_format(r):
    """An evaluate output written before loss settings: `loss_weights` instead."""
    r["loss_weights"] = r.pop("loss_settings")
    return r


def write(metrics, results):
    metrics.mkdir()
    for r in results:
        (metrics / f"{r['student']}.json").write_text(json.dumps(r))


def test_report_table_plots_and_sweep_filter(tmp_path, runner):
    metrics = tmp_path / "metrics"
    write(
        metrics,
        [
            result("mlp-ce", "mlp", "ce", None, 0.90),
            result("mlp-kd-t2", "mlp", "kd", 2.0, 0.95),
            old_format(result("mlp-kd-t4", "mlp", "kd", 4.0, 0.97)),
            result("mlp-dkd-t4", "mlp", "dkd", 4.0, 0.96),
            result("mlp-kd-t8", "mlp", "kd", 8.0, 0.50),  # stale: T=8 left the sweep
        ],
    )
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {"sweep": {"students": ["mlp"], "losses": ["kd", "dkd"], "temperatures": [2, 4]}}
        )
    )
    out, plots = tmp_path / "reports/summary.md", tmp_path / "reports/plots"
    args = ["report", "--metrics", metrics, "--out", out, "--plots", plots, "--params", params]
    assert invoke(runner, *args).exit_code == 0
    summary = out.read_text()
    lines = summary.splitlines()
    assert (
        "| cnn | teacher | – | – | – | 1.0 | 98.00 | 100.00 | 100.00 | 0 | 2.00 | 50,000 |"
        in summary
    )
    assert "| mlp | student `mlp-ce` (baseline) | ce | – | – | 0.1 | 90.00 |" in summary
    assert "| mlp | student `mlp-kd-t4` | kd | 4 | α=0.9 | 0.1 | 97.00 | 99.00 | 95.00 " in summary
    assert "mlp-kd-t8" not in "".join(row for row in lines if row.startswith("|"))
    assert "Not in the sweep, left out: mlp-kd-t8." in summary
    assert "`mlp-kd-t4` vs CE baseline `mlp-ce`: +7.00 points" in summary
    assert "| mlp | kd | α=0.9 | 0.1 | 95.00 | 97.00 |" in summary  # the temperature pivot
    for png in (report_plots.TEMPERATURE_PNG, report_plots.PARAMS_PNG):
        assert (plots / png).read_bytes()[:8] == PNG
    with open(plots / report_plots.TEMPERATURE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["student"], float(r["accuracy"])) for r in rows] == [
        ("mlp-dkd-t4", 0.96),  # fractions, as in the metrics files
        ("mlp-kd-t2", 0.95),
        ("mlp-kd-t4", 0.97),
    ]
    with open(plots / report_plots.STUDENTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["student"] == "teacher" and rows[0]["num_params"] == "50000"
    assert rows[1]["student"] == "mlp-ce"

    # Without --params every metrics file is reported.
    assert (
        invoke(runner, "report", "--metrics", metrics, "--out", out, "--overwrite").exit_code == 0
    )
    assert "mlp-kd-t8" in out.read_text()


def test_report_renders_any_setting_name_and_user_losses(tmp_path):
    user = "mypkg.losses:margin"
    margin = result("mlp-margin-t4", "mlp", user, 4.0, 0.96)
    margin["loss_settings"] = {"margin": 0.5, "beta": 2.0}
    results = [result("mlp-ce", "mlp", "ce", None, 0.90), margin]
    summary = report.render(results)
    assert (
        f"| mlp | student `mlp-margin-t4` | {user} | 4 | margin=0.5, β=2 | 0.1 | 96.00 |" in summary
    )
    assert report.format_settings({"alpha": 0.9, "tau": 1.5}) == "α=0.9, tau=1.5"
    assert report.format_settings({}) == report.format_settings(None) == "–"

    # A user loss has a colour of its own, the same every time; built-ins keep theirs.
    builtin = {figures.loss_color(name) for name in LOSSES}
    assert figures.loss_color(user) == figures.loss_color(user) not in builtin
    assert figures.loss_color("kd") == f"C{list(LOSSES).index('kd')}"
    assert len({figures.loss_marker(name) for name in LOSSES}) == len(LOSSES)
    report_plots.write_plots(results, tmp_path / "plots")
    with open(tmp_path / "plots" / report_plots.TEMPERATURE_CSV) as f:
        assert [r["loss"] for r in csv.DictReader(f)] == [user]


def test_report_errors(tmp_path, runner):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "s.md"
    assert_clean_error(invoke(runner, "report", "--metrics", empty, "--out", out), "no metrics")
    (empty / "x.json").write_text("{not json")
    assert_clean_error(invoke(runner, "report", "--metrics", empty, "--out", out), "not valid JSON")
    assert not out.exists()


def test_report_draws_the_teachers_most_ambiguous_test_samples(tmp_path, runner, test_cache):
    from pipeline.cache import open_cache
    from pipeline.report.figures import ambiguous_ids

    metrics = tmp_path / "metrics"
    write(metrics, [result("mlp-ce", "mlp", "ce", None, 0.90)])
    out, plots = tmp_path / "reports/summary.md", tmp_path / "reports/plots"
    args = ["report", "--metrics", metrics, "--out", out, "--plots", plots, "--cache", test_cache]
    result_ = invoke(runner, *args)
    assert result_.exit_code == 0, result_.output
    assert (plots / "dark_knowledge.png").read_bytes()[:8] == PNG
    with open_cache(test_cache) as cache:
        ids = ambiguous_ids(cache.logits()[:, 0], cache.sample_ids, 4)
    summary = out.read_text()
    assert f"most ambiguous (ids {', '.join(map(str, ids))})" in summary
    assert "](plots/dark_knowledge.png)" in summary

    bad = invoke(runner, "report", "--metrics", metrics, "--out", tmp_path / "x.md",
                 "--cache", test_cache)  # fmt: skip
    assert_clean_error(bad, "--cache draws a figure into --plots")


def test_report_reads_metrics_files_with_their_sidecars_as_whole_results(tmp_path):
    from pipeline.evaluate.results import info_path, split_result

    results = [
        result("mlp-ce", "mlp", "ce", None, 0.90),
        result("mlp-kd-t4", "mlp", "kd", 4.0, 0.97),
    ]
    split_dir, whole_dir = tmp_path / "split", tmp_path / "whole"
    write(whole_dir, results)
    split_dir.mkdir()
    for r in results:
        numbers, info, run = split_result(r)
        assert set(numbers) >= {"accuracy", "flops_per_sample"} and "loss" not in numbers
        assert run == {}  # a result with no measured latency
        (split_dir / f"{r['student']}.json").write_text(json.dumps(numbers))
        info_path(split_dir / f"{r['student']}.json").write_text(json.dumps(info))
        # A run record beside them is neither a result nor part of one.
        (split_dir / f"{r['student']}.run.json").write_text('{"threads": 2}')
    split, _ = report.load_results(split_dir)
    whole, _ = report.load_results(whole_dir)
    assert report.render(split) == report.render(whole)


def test_report_gives_each_teacher_its_row_and_students(tmp_path):
    a = result("mlp-kd-t4", "mlp", "kd", 4.0, 0.97)
    b = result("mlp-kd-t2", "mlp", "kd", 2.0, 0.95)
    b["teacher"] = {"models": ["r56", "r110"], "num_params": 9, "fingerprint": "f2",
                    "combine": "mean-probs"}  # fmt: skip
    a["teacher"]["fingerprint"] = "f1"
    lines = report.render([a, b]).splitlines()
    table = lines[: lines.index("Test top-1 % by temperature:")]
    rows = [line for line in table if " | teacher" in line or " | student `" in line]
    roles = [row.split(" | ")[1] for row in rows]
    assert roles == ["teacher", "student `mlp-kd-t4`", "teacher (2 members, mean-probs)",
                     "student `mlp-kd-t2`"]  # fmt: skip
    assert rows[1].endswith("| 4.0 | 2 |")  # size KiB, kFLOPs per sample (2 x 1,000)
    # The pivot names each student's teacher: one row each, not one cell overwritten.
    assert "| mlp | kd | α=0.9 | 0.1 | cnn | – | 97.00 |" in lines
    assert "| mlp | kd | α=0.9 | 0.1 | r56+r110 | 95.00 | – |" in lines


def _pivot_rows(summary: str) -> list[str]:
    lines = summary.splitlines()
    start = lines.index("Test top-1 % by temperature:")
    return [line for line in lines[start + 4 :] if line.startswith("|")]


def test_pivot_gives_each_distinct_student_its_row(tmp_path):
    """Same preset, loss and temperature but another alpha, labelled fraction or teacher, or
    the same setup twice: every accuracy is in the pivot, none written over."""
    results = [
        result(f"mlp-kd-t{t:g}", "mlp", "kd", t, acc) for t, acc in ((2.0, 0.95), (4.0, 0.97))
    ]
    alpha = result("mlp-kd-a5-t4", "mlp", "kd", 4.0, 0.81)
    alpha["loss_settings"] = {"alpha": 0.5}
    labelled = result("mlp-kd-half-t4", "mlp", "kd", 4.0, 0.82)
    labelled["labeled_fraction"] = 0.5
    other = result("mlp-kd-big-t4", "mlp", "kd", 4.0, 0.83)
    other["teacher"] = {"models": ["r56"], "num_params": 9, "fingerprint": "f2"}
    again = result("mlp-kd-t4-seed2", "mlp", "kd", 4.0, 0.84)  # the same setup as mlp-kd-t4
    rows = _pivot_rows(report.render([*results, alpha, labelled, other, again]))
    assert rows == [
        "| mlp | kd | α=0.5 | 0.1 | cnn | – | 81.00 |",
        "| mlp (`mlp-kd-t2`, `mlp-kd-t4`) | kd | α=0.9 | 0.1 | cnn | 95.00 | 97.00 |",
        "| mlp (`mlp-kd-t4-seed2`) | kd | α=0.9 | 0.1 | cnn | – | 84.00 |",
        "| mlp | kd | α=0.9 | 0.1 | r56 | – | 83.00 |",
        "| mlp | kd | α=0.9 | 0.5 | cnn | – | 82.00 |",
    ]
    # Read from files, a run is named by its metrics file, whatever its `student` field says.
    again["student"] = "mlp-kd-t4"
    write(tmp_path / "m", [*results, alpha])
    (tmp_path / "m" / "mlp-kd-t4-seed2.json").write_text(json.dumps(again))
    loaded, _ = report.load_results(tmp_path / "m")
    assert "| mlp (`mlp-kd-t4-seed2`) | kd | α=0.9 | 0.1 | – | 84.00 |" in report.render(loaded)


def test_params_plot_spreads_models_of_one_size_that_would_touch(tmp_path, monkeypatch):
    """Students of one size whose markers would touch are drawn at distinct x (CE first, then
    by loss and temperature), close to their true size; one alone at its height stays at its
    true size; every point is labelled with its short name and accuracy; the CSV keeps the
    true counts."""
    students = [
        result("mlp-ce", "mlp", "ce", None, 0.90),  # alone at its height
        result("mlp-kd-t2", "mlp", "kd", 2.0, 0.95),
        result("mlp-kd-t4", "mlp", "kd", 4.0, 0.95),
        result("mlp-dkd-t4", "mlp", "dkd", 4.0, 0.9502),  # touches the two at 0.95
        result("big-kd-t4", "big", "kd", 4.0, 0.96, params=5000),  # alone at its size
    ]
    xs = report_plots.params_positions(students, 0.98)
    assert xs[0] == 1000.0 and xs[4] == 5000.0
    assert len(set(xs[1:4])) == 3 and all(900 < x < 1100 for x in xs[1:4])
    # dkd-t4, kd-t2, kd-t4 from left to right, 0.02 decades apart around 1000
    assert sorted(range(1, 4), key=lambda i: xs[i]) == [3, 1, 2]
    assert xs[1] / xs[3] == pytest.approx(10**0.02) and xs[2] / xs[1] == pytest.approx(10**0.02)

    drawn = {}
    monkeypatch.setattr(
        report_plots, "plot_params", lambda series, teacher, *a: drawn.update(s=series, t=teacher)
    )
    report_plots.write_plots(students, tmp_path / "plots")
    points = [p for s in drawn["s"] for p in s.points]
    assert sorted(p.x for p in points) == sorted(xs)
    assert sorted(p.label for p in points) == [
        "ce-mlp 0.900", "dkd@4-mlp 0.950", "kd@2-mlp 0.950", "kd@4-big 0.960", "kd@4-mlp 0.950"
    ]  # fmt: skip
    assert {p.column for p in points} == {1000.0, 5000.0}  # labels stack per true size
    assert (drawn["t"].x, drawn["t"].label) == (50000, "teacher 0.980")
    with open(tmp_path / "plots" / report_plots.STUDENTS_CSV) as f:
        sizes = [int(r["num_params"]) for r in csv.DictReader(f)]
    assert sizes == [50000, 1000, 5000, 1000, 1000, 1000]


def test_plots_are_drawn_and_label_every_point(tmp_path):
    """The PNGs are written, and points at one temperature are spread by loss."""
    students = [
        result("mlp-ce", "mlp", "ce", None, 0.90),
        *(result(f"mlp-{loss}-t{t}", "mlp", loss, float(t), 0.95) for loss in ("kd", "dkd")
          for t in (2, 4)),
    ]  # fmt: skip
    paths = report_plots.write_plots(students, tmp_path / "plots")
    for png in (report_plots.TEMPERATURE_PNG, report_plots.PARAMS_PNG):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == PNG
    assert {p.name for p in paths} >= {report_plots.TEMPERATURE_PNG, report_plots.PARAMS_PNG}
    series = report_plots._temperature_series(students)
    assert [s.name for s in series] == ["dkd", "kd"]
    at_4 = sorted((p.x, s.name) for s in series for p in s.points if p.column == 4.0)
    assert [name for _, name in at_4] == ["dkd", "kd"] and at_4[0][0] < 4.0 < at_4[1][0]
    assert all(p.label == "0.950" for s in series for p in s.points)


def test_label_stack_keeps_labels_apart_and_near_their_points():
    stack = figures._stack
    assert stack([10.0, 50.0], 5, 0, 100) == [10.0, 50.0]  # far apart: where wanted
    assert stack([10.0, 10.0, 10.0], 5, 0, 100) == [5.0, 10.0, 15.0]  # centred on them
    assert stack([1.0, 1.0], 5, 0, 100) == [0.0, 5.0]  # kept inside the axes
    assert stack([99.0, 99.0], 5, 0, 100) == [95.0, 100.0]


def test_extreme_ece_is_flagged_with_a_footnote():
    """Flagged: ECE above 15%, or above 5% and more than 3x the teacher's."""
    assert report.ece_is_extreme(0.312, 0.30) and report.ece_is_extreme(0.16, None)
    assert report.ece_is_extreme(0.08, 0.02)  # 4x the teacher's, above 5%
    assert not report.ece_is_extreme(0.08, 0.03)  # under 3x the teacher's
    assert not report.ece_is_extreme(0.04, 0.001)  # 40x, but under 5%
    assert not report.ece_is_extreme(0.15, None) and not report.ece_is_extreme(None, 0.02)

    calm = result("mlp-kd-t4", "mlp", "kd", 4.0, 0.97)  # ECE 5%, teacher 2%
    summary = report.render([calm])
    assert "| 0.1000 | 5.00 | 1,000 |" in summary
    assert report.ECE_FLAG not in summary and report.ECE_FOOTNOTE not in summary

    wild = result("mlp-dkd-t4", "mlp", "dkd", 4.0, 0.96)
    wild["ece"] = 0.312
    lines = report.render([calm, wild]).splitlines()
    assert any(
        "student `mlp-dkd-t4`" in row and "| 0.1000 | 31.20 ⚠ | 1,000 |" in row for row in lines
    )
    assert any("student `mlp-kd-t4`" in row and "| 0.1000 | 5.00 | 1,000 |" in row for row in lines)
    last_row = max(i for i, line in enumerate(lines) if line.startswith("| mlp |"))
    assert lines[last_row + 1 : last_row + 3] == ["", report.ECE_FOOTNOTE]
    assert "above 15%, or above 5% and more than 3× the teacher's" in report.ECE_FOOTNOTE


def _summary_results() -> list[dict]:
    ce = result("mlp-ce", "mlp", "ce", None, 0.9055555)
    kd = result("mlp-kd-t2", "mlp", "kd", 2.0, 0.9777777)
    kd["agreement"] = 0.9750001
    dkd = result("mlp-dkd-t4", "mlp", "dkd", 4.0, 0.95)
    return [ce, kd, dkd]


def test_summary_metrics_are_the_headline_numbers():
    assert report.summary_metrics(_summary_results()) == {
        "best": "kd@2",
        "gain": 0.072,  # 0.97778 - 0.90556
        "ce": 0.906,
        "dkd@4": 0.95,
        "kd@2": 0.978,
        "teacher": 0.98,
        "agreement": {"ce": 0.95, "dkd@4": 0.95, "kd@2": 0.975},
    }
    # Short, flat keys in a fixed order: best and gain first, then CE, then by loss and T.
    assert list(report.summary_metrics(_summary_results())) == [
        "best", "gain", "ce", "dkd@4", "kd@2", "teacher", "agreement"
    ]  # fmt: skip
    # Without a CE baseline there is no best nor gain; an unmeasured accuracy is left out,
    # not null.
    unlabelled = result("mlp-kd-t4", "mlp", "kd", 4.0, None)
    unlabelled["teacher_accuracy"] = None
    assert report.summary_metrics([unlabelled]) == {"agreement": {"kd@4": 0.95}}


def test_short_names_are_unique_and_short():
    ce, kd = result("mlp-ce", "mlp", "ce", None, 0.9), result("mlp-kd-t2", "mlp", "kd", 2.0, 0.9)
    half = result("mlp-kd-t0.5", "mlp", "kd", 0.5, 0.9)
    assert report.short_names([ce, kd, half]) == {
        "mlp-ce": "ce", "mlp-kd-t2": "kd@2", "mlp-kd-t0.5": "kd@0.5"
    }  # fmt: skip
    big = result("big-kd-t2", "big", "kd", 2.0, 0.9)  # several presets: each named after it
    assert report.short_names([ce, kd, big]) == {
        "mlp-ce": "ce-mlp", "mlp-kd-t2": "kd@2-mlp", "big-kd-t2": "kd@2-big"
    }  # fmt: skip
    again = result("mlp-kd-t2-seed1", "mlp", "kd", 2.0, 0.9)  # the same setup twice
    assert report.short_names([kd, again]) == {
        "mlp-kd-t2": "kd@2-mlp-kd-t2", "mlp-kd-t2-seed1": "kd@2-mlp-kd-t2-seed1"
    }  # fmt: skip


def _tied(name: str, agreement: float, ece: float) -> dict:
    r = result(name, "mlp", name.split("-")[1], float(name[-1]), 0.9778)
    r.update(agreement=agreement, ece=ece)
    return r


def test_a_tie_for_best_is_broken_by_agreement_then_calibration_and_said():
    """Three students tie on accuracy; the one with the most agreement wins, and when two
    of them also tie there, the better calibrated (lower ECE); the report says so."""
    ce = result("mlp-ce", "mlp", "ce", None, 0.9)
    by_agreement = [
        _tied("mlp-dist-t4", 0.9750, 0.3976),
        _tied("mlp-dkd-t2", 0.9806, 0.0327),
        _tied("mlp-kd-t4", 0.9722, 0.0137),
    ]
    best, note = report.best_of(by_agreement)
    assert best["student"] == "mlp-dkd-t2"
    assert note == (
        "It was a tie: `mlp-dist-t4`, `mlp-dkd-t2` and `mlp-kd-t4` share the best top-1 "
        "(97.78 %). Broken by agreement with the teacher: `mlp-dkd-t2` agrees on 98.06 % "
        "(`mlp-dist-t4` 97.50 %, `mlp-kd-t4` 97.22 %)."
    )
    # The case: the flagged student ties on agreement too, and loses on ECE.
    by_ece = [
        _tied("mlp-dist-t4", 0.9806, 0.3976),
        _tied("mlp-dkd-t2", 0.9806, 0.0327),
        _tied("mlp-kd-t4", 0.9722, 0.0137),
    ]
    summary = report.render([ce, *by_ece])
    assert (
        "Best distilled student `mlp-dkd-t2` vs CE baseline `mlp-ce`: +7.78 points of test "
        "accuracy. It was a tie: `mlp-dist-t4`, `mlp-dkd-t2` and `mlp-kd-t4` share the best "
        "top-1 (97.78 %). Broken by agreement with the teacher, where `mlp-dist-t4` and "
        "`mlp-dkd-t2` tie again (98.06 %), then by calibration: `mlp-dkd-t2` has the lower "
        "ECE, 3.27 % (`mlp-dist-t4` 39.76 %)."
    ) in summary
    assert "Its ECE is flagged" not in summary
    assert report.summary_metrics([ce, *by_ece])["best"] == "dkd@2"
    # Equal in all three: first by run name, and said so.
    same = [_tied("mlp-kd-t4", 0.98, 0.03), _tied("mlp-dkd-t2", 0.98, 0.03)]
    best, note = report.best_of(same)
    assert best["student"] == "mlp-dkd-t2" and note.endswith("comes first by name.")
    # No tie, no note; a flagged winner is said to be flagged.
    alone = _tied("mlp-kd-t4", 0.98, 0.40)
    assert report.best_of([alone, result("mlp-kd-t2", "mlp", "kd", 2.0, 0.9)]) == (alone, None)
    assert "Its ECE is flagged ⚠" in report.render([ce, alone])


def test_report_writes_the_summary_metrics_file(tmp_path, runner):
    metrics = tmp_path / "metrics"
    write(metrics, _summary_results())
    out, summary = tmp_path / "reports/summary.md", tmp_path / "reports/metrics.json"
    args = ["report", "--metrics", metrics, "--out", out, "--summary-metrics", summary]
    result_ = invoke(runner, *args)
    assert result_.exit_code == 0, result_.output
    assert f"summary metrics in {summary}" in result_.output
    written = json.loads(summary.read_text())
    assert written == report.summary_metrics(report.load_results(metrics)[0])
    assert (written["best"], written["gain"]) == ("kd@2", 0.072)
    assert sorted(written["agreement"]) == ["ce", "dkd@4", "kd@2"]
    assert sorted(p.name for p in summary.parent.iterdir()) == ["metrics.json", "summary.md"]

    assert_clean_error(invoke(runner, *args), f"{out} already exists")
    inside = ["--out", tmp_path / "s.md", "--summary-metrics", metrics / "summary.json"]
    assert_clean_error(
        invoke(runner, "report", "--metrics", metrics, *inside),
        f"--summary-metrics {metrics / 'summary.json'} is inside the input --metrics",
    )
    plots = tmp_path / "plots"
    in_plots = ["--plots", plots, "--summary-metrics", plots / "m.json"]
    assert_clean_error(
        invoke(runner, "report", "--metrics", metrics, "--out", tmp_path / "s.md", *in_plots),
        f"--summary-metrics {plots / 'm.json'} is or lies inside --plots {plots}",
    )
    assert not (tmp_path / "s.md").exists() and not (metrics / "summary.json").exists()


def test_training_curves_csv_holds_every_students_log(tmp_path, runner):
    """The per-epoch log each student carries (through evaluate's sidecar) becomes one long
    table for `dvc plots show`: a row per student and epoch, held-out accuracy a fraction,
    the loss also relative to its first epoch (losses differ in scale)."""
    kd, ce = result("mlp-kd-t4", "mlp", "kd", 4.0, 0.97), result("mlp-ce", "mlp", "ce", None, 0.9)
    kd["training"] = [
        {"epoch": 1, "loss": 2.5, "train_accuracy": 0.5, "lr": 0.002, "heldout_accuracy": 0.61},
        {"epoch": 2, "loss": 1.25, "train_accuracy": 0.7, "lr": 0.001, "heldout_accuracy": 0.8},
    ]
    ce["training"] = [{"epoch": 1, "loss": 0.5, "train_accuracy": 0.9, "lr": 0.01}]  # no holdout
    write(tmp_path / "metrics", [kd, ce])
    plots = tmp_path / "plots"
    args = ["report", "--metrics", tmp_path / "metrics", "--out", tmp_path / "s.md"]
    assert invoke(runner, *args, "--plots", plots).exit_code == 0
    with open(plots / report_plots.TRAINING_CSV) as f:
        rows = list(csv.DictReader(f))
    fields = ("student", "loss_name", "epoch", "loss", "loss_relative", "heldout_accuracy")
    assert [tuple(r[k] for k in fields) for r in rows] == [
        ("mlp-ce", "ce", "1", "0.5", "1.0", ""),
        ("mlp-kd-t4", "kd", "1", "2.5", "1.0", "0.61"),
        ("mlp-kd-t4", "kd", "2", "1.25", "0.5", "0.8"),
    ]
