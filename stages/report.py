"""Stage: one Markdown summary of the teacher, the CE baselines and every student, with plots.

Inputs are evaluate outputs (metrics/*.json). Outputs: the summary, and in a plots directory
two PNGs and the CSV data `dvc plots show` renders. The rendering lives in `pipeline.report`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import SweepConfig
from pipeline.errors import PipelineError
from pipeline.figures import DEFAULT_TEMPERATURES, plot_targets, read_targets
from pipeline.fsutil import atomic_output, check_not_input, check_writable
from pipeline.report import load_results, render, write_plots

DARK_KNOWLEDGE_PNG = "dark_knowledge.png"


def run(
    metrics_dir: Path,
    out: Path,
    plots: Path | None = None,
    sweep: SweepConfig | None = None,
    overwrite: bool = False,
    cache: Path | None = None,
) -> Path:
    """Read every `*.json` from `metrics_dir` (evaluate outputs) and write `out`.

    `plots`: also write the PNGs and CSVs there. `sweep`: leave out students not in it.
    `cache`: the test cache, whose most ambiguous samples are drawn at several temperatures.
    """
    if cache is not None and plots is None:
        raise PipelineError("--cache draws a figure into --plots: give --plots too")
    inputs = {"--metrics": Path(metrics_dir), "--cache": None if cache is None else Path(cache)}
    for option, path in (("--out", out), ("--plots", plots)):
        if path is not None:
            check_not_input(Path(path), inputs, option)
            check_writable(Path(path), overwrite)
    results, left_out = load_results(Path(metrics_dir), sweep)
    figure = None
    if plots is not None:
        with atomic_output(plots, overwrite) as tmp:
            write_plots(results, tmp)
            if cache is not None:
                targets = read_targets(Path(cache), None)
                plot_targets(targets, DEFAULT_TEMPERATURES, tmp / DARK_KNOWLEDGE_PNG)
                link = os.path.relpath(Path(plots) / DARK_KNOWLEDGE_PNG, Path(out).parent)
                figure = (targets["ids"], link)
    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(render(results, left_out, figure))
    return Path(out)
