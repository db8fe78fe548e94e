"""Report: the summary table, the sweep filter, and the plots people look at."""

import csv
import json

import pytest

from pipeline import report
from pipeline.losses import LOSSES
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
        "latency_ms_per_sample": {"1": 0.01, "256": 0.001},
        "latency_threads": 1,
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
    for png in (report.TEMPERATURE_PNG, report.PARAMS_PNG):
        assert (plots / png).read_bytes()[:8] == PNG
    with open(plots / report.TEMPERATURE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["student"], float(r["accuracy"])) for r in rows] == [
        ("mlp-dkd-t4", 96.0),
        ("mlp-kd-t2", 95.0),
        ("mlp-kd-t4", 97.0),
    ]
    with open(plots / report.STUDENTS_CSV) as f:
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
    builtin = {report.loss_color(name) for name in LOSSES}
    assert report.loss_color(user) == report.loss_color(user) not in builtin
    assert report.loss_color("kd") == f"C{list(LOSSES).index('kd')}"
    report.write_plots(results, tmp_path / "plots")
    with open(tmp_path / "plots" / report.TEMPERATURE_CSV) as f:
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
    from pipeline.figures import ambiguous_ids

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
    from pipeline.results import info_path, split_result

    results = [
        result("mlp-ce", "mlp", "ce", None, 0.90),
        result("mlp-kd-t4", "mlp", "kd", 4.0, 0.97),
    ]
    split_dir, whole_dir = tmp_path / "split", tmp_path / "whole"
    write(whole_dir, results)
    split_dir.mkdir()
    for r in results:
        numbers, info = split_result(r)
        assert set(numbers) >= {"accuracy", "latency_ms_at_1"} and "loss" not in numbers
        (split_dir / f"{r['student']}.json").write_text(json.dumps(numbers))
        info_path(split_dir / f"{r['student']}.json").write_text(json.dumps(info))
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
    assert rows[1].endswith("| 0.01 | 0.001 |")  # latency with its significant digits
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


def test_params_plot_spreads_models_of_one_size(tmp_path, monkeypatch):
    """Students of one size are drawn at distinct x (CE first, then by loss and temperature),
    close to their true size; the CSV keeps the true counts."""
    students = [
        result("mlp-ce", "mlp", "ce", None, 0.90),
        result("mlp-kd-t2", "mlp", "kd", 2.0, 0.95),
        result("mlp-kd-t4", "mlp", "kd", 4.0, 0.95),
        result("mlp-dkd-t4", "mlp", "dkd", 4.0, 0.95),
        result("big-kd-t4", "big", "kd", 4.0, 0.96, params=5000),  # alone at its size
    ]
    xs = report.params_positions(students)
    assert xs[4] == 5000.0
    assert len(set(xs[:4])) == 4 and all(900 < x < 1100 for x in xs[:4])
    # ce, dkd-t4, kd-t2, kd-t4 from left to right, 0.02 decades apart around 1000
    order = sorted(range(4), key=lambda i: xs[i])
    assert order == [0, 3, 1, 2]
    assert xs[3] / xs[0] == pytest.approx(10**0.02) and xs[2] / xs[1] == pytest.approx(10**0.02)

    drawn = []
    monkeypatch.setattr(
        report,
        "_save",
        lambda plt, fig, ax, path: (
            drawn.append([tuple(p) for c in ax.collections for p in c.get_offsets()]),
            plt.close(fig),
        ),
    )
    report.write_plots(students, tmp_path / "plots")
    params_points = drawn[1]  # after the temperature plot
    assert sorted(x for x, _ in params_points) == sorted([*xs, 50000.0])  # + the teacher
    with open(tmp_path / "plots" / report.STUDENTS_CSV) as f:
        sizes = [int(r["num_params"]) for r in csv.DictReader(f)]
    assert sizes == [50000, 1000, 5000, 1000, 1000, 1000]


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
        "teacher": {"accuracy": 0.98},
        "best_gain_points": 7.22222,  # 97.77777 - 90.55555
        "students": {
            "mlp-ce": {"accuracy": 0.90556, "agreement": 0.95},
            "mlp-dkd-t4": {"accuracy": 0.95, "agreement": 0.95},
            "mlp-kd-t2": {"accuracy": 0.97778, "agreement": 0.975},
        },
    }
    # Without a CE baseline there is no gain; an unmeasured accuracy is left out, not null.
    unlabelled = result("mlp-kd-t4", "mlp", "kd", 4.0, None)
    unlabelled["teacher_accuracy"] = None
    assert report.summary_metrics([unlabelled]) == {
        "teacher": {},
        "students": {"mlp-kd-t4": {"agreement": 0.95}},
    }


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
    assert written["best_gain_points"] == 7.22222
    assert sorted(written["students"]) == ["mlp-ce", "mlp-dkd-t4", "mlp-kd-t2"]
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
    table for `dvc plots show`: a row per student and epoch, held-out accuracy in %."""
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
    with open(plots / report.TRAINING_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["student"], r["epoch"], r["loss"], r["heldout_accuracy"]) for r in rows] == [
        ("mlp-ce", "1", "0.5", ""),
        ("mlp-kd-t4", "1", "2.5", "61.0"),
        ("mlp-kd-t4", "2", "1.25", "80.0"),
    ]
