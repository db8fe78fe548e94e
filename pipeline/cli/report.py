"""The report's commands: report, show-targets."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import (
    comma_list,
    friendly_errors,
    overwrite_option,
)
from pipeline.core.errors import PipelineError


@click.command("report")
@click.option(
    "--metrics",
    "metrics_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory of evaluate outputs (*.json).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Markdown to write.")
@click.option(
    "--plots",
    default=None,
    type=click.Path(file_okay=False),
    help="Also write PNG plots and their CSV data (for `dvc plots show`) to this directory.",
)
@click.option(
    "--params",
    type=click.Path(dir_okay=False),
    default=None,
    help="params.yaml whose `sweep` section selects the students (stale metrics are left out).",
)
@click.option(
    "--cache",
    type=click.Path(),
    default=None,
    help="Test cache: also draw the samples its teacher finds most ambiguous at T = 1, 4, 8 "
    "into --plots (dark knowledge).",
)
@click.option(
    "--summary-metrics",
    "summary",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the headline numbers as a small flat JSON (for DVC `metrics:` and an "
    "80-column `dvc exp show`): the best student (`best`, e.g. dkd@2), its gain over the CE "
    "baseline (`gain`), each run's top-1 (`ce`, `kd@4`, ...), the teacher's, and each run's "
    "agreement, as fractions rounded to 3 decimals.",
)
@overwrite_option
@friendly_errors
def report(metrics_dir, out, plots, params, cache, summary, overwrite) -> None:
    """Summarise the teacher, the CE baselines and every student in one Markdown table."""
    from pipeline.core.config import SweepConfig, layered, load_params
    from stages import report as stage

    values, sweep = load_params(params), None
    if params is not None and "sweep" in values:
        sweep = layered(SweepConfig, values, params, "sweep", {})
    plots_dir = None if plots is None else Path(plots)
    from pipeline.cache.store import location

    test_cache = None if cache is None else location(cache)
    summary_file = None if summary is None else Path(summary)
    path = stage.run(
        Path(metrics_dir), Path(out), plots_dir, sweep, overwrite, test_cache, summary_file
    )
    click.echo(
        f"report written to {path}"
        + (f", plots in {plots}" if plots else "")
        + (f", summary metrics in {summary}" if summary else "")
    )


@click.command("show-targets")
@click.argument("cache", type=click.Path())
@click.option(
    "--id",
    "ids",
    default=None,
    help="Comma-separated sample ids to show (default: the --count samples the teacher finds "
    "most ambiguous: the smallest gap between its top two probabilities).",
)
@click.option(
    "--temperatures",
    default="1,4,8",
    show_default=True,
    help="Comma-separated temperatures, one bar per class and temperature.",
)
@click.option("--count", type=int, default=4, show_default=True, help="Samples when no --id.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@overwrite_option
@friendly_errors
def show_targets(cache, ids, temperatures, count, out, overwrite) -> None:
    """Plot a sample's teacher distribution at several temperatures: the dark knowledge a
    student learns from soft targets (e.g. how much a 7 looks like a 1).

    \b
    Example:
      pipeline show-targets caches/test.zarr --id 42 --temperatures 1,4,8 --out fig.png
    """
    from stages import show_targets as stage

    chosen = comma_list(ids, "--id", int)
    temps = comma_list(temperatures, "--temperatures", float)
    if count < 1:
        raise PipelineError(f"--count must be >= 1, got {count}")
    from pipeline.cache.store import location

    shown = stage.run(
        location(cache), list(dict.fromkeys(chosen)) if chosen else None, tuple(temps), Path(out),
        count, overwrite,
    )  # fmt: skip
    click.echo(f"targets of sample ids {', '.join(map(str, shown))} written to {out}")
