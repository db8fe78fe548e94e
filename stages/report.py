"""Stage: one Markdown summary of the teacher, the CE baselines and every student, with plots.

Inputs are evaluate outputs (metrics/*.json). Outputs: the summary, in a plots directory the
PNGs and the CSV data `dvc plots show` renders, and optionally a small JSON of the headline
numbers (the pipeline's DVC metrics). The rendering lives in `pipeline.report.report` and
`pipeline.report.figures`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.cache.store import location
from pipeline.core.config import SweepConfig
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_output, check_not_input, check_writable, json_text
from pipeline.report.figures import DEFAULT_TEMPERATURES, plot_targets, read_targets
from pipeline.report.plots import write_plots
from pipeline.report.report import load_results, render, summary_metrics

DARK_KNOWLEDGE_PNG = "dark_knowledge.png"


def run(
    metrics_dir: Path,
    out: Path,
    plots: Path | None = None,
    sweep: SweepConfig | None = None,
    overwrite: bool = False,
    cache: Path | None = None,
    summary: Path | None = None,
) -> Path:
    """Read every `*.json` from `metrics_dir` (evaluate outputs) and write `out`.

    `plots`: also write the PNGs and CSVs there. `sweep`: leave out students not in it.
    `cache`: the test cache, whose most ambiguous samples are drawn at several temperatures.
    `summary`: also write the headline numbers there as JSON (`summary_metrics`).
    """
    if cache is not None and plots is None:
        raise PipelineError("--cache draws a figure into --plots: give --plots too")
    _check_outputs(metrics_dir, cache, out, plots, summary, overwrite)
    results, left_out = load_results(Path(metrics_dir), sweep)
    figure = None
    if plots is not None:
        with atomic_output(plots, overwrite) as tmp:
            write_plots(results, tmp)
            if cache is not None:
                targets = read_targets(location(cache), None)
                plot_targets(targets, DEFAULT_TEMPERATURES, tmp / DARK_KNOWLEDGE_PNG)
                link = os.path.relpath(Path(plots) / DARK_KNOWLEDGE_PNG, Path(out).parent)
                figure = (targets["ids"], link)
    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(render(results, left_out, figure))
    if summary is not None:  # last: a failed report leaves no fresh summary beside a stale one
        with atomic_output(summary, overwrite) as tmp:
            tmp.write_text(json_text(summary_metrics(results)))
    return Path(out)


def _check_outputs(
    metrics_dir: Path,
    cache: Path | None,
    out: Path,
    plots: Path | None,
    summary: Path | None,
    overwrite: bool,
) -> None:
    """Refuse, before any work, an output that is or lies inside an input, one that exists
    without --overwrite, and a summary file that --out or --plots would write over."""
    inputs = {"--metrics": Path(metrics_dir), "--cache": None if cache is None else location(cache)}
    for option, path in (("--out", out), ("--plots", plots), ("--summary-metrics", summary)):
        if path is not None:
            check_not_input(Path(path), inputs, option)
            check_writable(Path(path), overwrite)
    if summary is None:
        return
    target = Path(summary).expanduser().resolve()
    for option, path in (("--out", out), ("--plots", plots)):
        other = None if path is None else Path(path).expanduser().resolve()
        if other is not None and (target == other or other in target.parents):
            raise PipelineError(
                f"--summary-metrics {summary} is or lies inside {option} {path}; "
                "give it a path of its own"
            )
