"""Stage: one Markdown summary of the teacher, the CE baselines and every student, with plots.

Inputs are evaluate outputs (metrics/*.json). Outputs: the summary, and in a plots directory
two PNGs and the CSV data `dvc plots show` renders. The rendering lives in `pipeline.report`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import SweepConfig
from pipeline.fsutil import atomic_output, check_writable
from pipeline.report import load_results, render, write_plots


def run(
    metrics_dir: Path,
    out: Path,
    plots: Path | None = None,
    sweep: SweepConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Read every `*.json` from `metrics_dir` (evaluate outputs) and write `out`.

    `plots`: also write the PNGs and CSVs there. `sweep`: leave out students not in it.
    """
    for path in (out, plots):
        if path is not None:
            check_writable(Path(path), overwrite)
    results, left_out = load_results(Path(metrics_dir), sweep)
    if plots is not None:
        with atomic_output(plots, overwrite) as tmp:
            write_plots(results, tmp)
    with atomic_output(out, overwrite) as tmp:
        tmp.write_text(render(results, left_out))
    return Path(out)
