"""Report: the summary table, the sweep filter, and the plots people look at."""

import csv
import json

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
    assert "| mlp | kd | 95.00 | 97.00 |" in summary  # the temperature pivot
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
    rows = [line for line in lines if " | teacher" in line or " | student `" in line]
    roles = [row.split(" | ")[1] for row in rows]
    assert roles == ["teacher", "student `mlp-kd-t4`", "teacher (2 members, mean-probs)",
                     "student `mlp-kd-t2`"]  # fmt: skip
    assert rows[1].endswith("| 0.01 | 0.001 |")  # latency with its significant digits
