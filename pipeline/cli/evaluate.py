"""After stage two: evaluate, export."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.common import (
    ConfigCommand,
    device_option,
    friendly_errors,
    given,
    overwrite_option,
    params_option,
    resolve_config,
    threads_option,
)


@click.command("evaluate", cls=ConfigCommand, config="pipeline.core.config:EvaluateConfig")
@click.option("--student", required=True, type=click.Path(), help="Student directory.")
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache of the test split.")
@click.option("--data", required=True, help="Test transfer set, e.g. digits:test.")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="metrics.json to write."
)
@click.option("--batch-size", type=int, default=None, help="Inference batch size.")
@click.option(
    "--cross-modal",
    is_flag=True,
    default=None,
    help="Join the test data to the cache by sample ids only.",
)
@click.option(
    "--other-teacher",
    is_flag=True,
    default=None,
    help="Allow a test cache made by another teacher than the student's train cache.",
)
@click.option("--ece-bins", type=int, default=None, help="Calibration bins.")
@click.option(
    "--model",
    default=None,
    metavar="PACKAGE.MODULE:FUNCTION",
    help="The student's own factory, when it was trained from one: a student directory "
    "names its model but never runs code, so you name the code you trust.",
)
@click.option(
    "--latency-runs",
    type=int,
    default=None,
    help="Timed CPU runs at batch 1 and 256 (0 skips latency).",
)
@click.option(
    "--latency-threads",
    type=int,
    default=None,
    help="CPU threads while timing (0: torch's default).",
)
@threads_option
@device_option
@params_option
@overwrite_option
@friendly_errors
def evaluate(
    student,
    cache,
    data,
    out,
    batch_size,
    cross_modal,
    other_teacher,
    ece_bins,
    latency_runs,
    latency_threads,
    model,
    threads,
    device,
    params,
    overwrite,
) -> None:
    """Top-1/top-5 accuracy, agreement and KL with the teacher, calibration, size and CPU
    latency; the teacher's outputs come from the test cache (the teacher is not loaded)."""
    from pipeline.core.config import EvaluateConfig
    from stages import evaluate as stage

    cfg = resolve_config(
        EvaluateConfig,
        params,
        "evaluate",
        given(
            batch_size=batch_size,
            cross_modal=cross_modal or None,
            other_teacher=other_teacher or None,
            ece_bins=ece_bins,
            latency_runs=latency_runs,
            latency_threads=latency_threads,
            model=model,
            threads=threads,
            device=device,
        ),
    )
    from pipeline.cache.store import location

    result = stage.run(cfg, Path(student), location(cache), data, Path(out), overwrite=overwrite)
    if "bits_per_token" in result:  # a language model
        agree = result.get("top1_agreement")  # none from a sampled cache
        agreement = "" if agree is None else f", top-1 agreement {agree:.4f}"
        click.echo(f"{result['student']}: {result['bits_per_token']:.4f} bits per token"
                   f"{agreement} → {out}")  # fmt: skip
        return
    acc = result["accuracy"]
    click.echo(
        f"{result['student']}: accuracy {'–' if acc is None else f'{acc:.4f}'}, "
        f"agreement {result['agreement']:.4f} → {out}"
    )


@click.command("export", cls=ConfigCommand, config="pipeline.core.config:ExportConfig")
@click.option("--student", required=True, type=click.Path(), help="Student directory.")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="File to write (.pt, .onnx)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "torchscript", "onnx"]),
    default=None,
    help="auto: onnx for an .onnx --out, else torchscript; onnx needs the onnx extra.",
)
@click.option(
    "--check-rows", type=int, default=None, help="Random inputs the export must reproduce."
)
@click.option("--opset", type=int, default=None, help="ONNX opset version.")
@click.option(
    "--model",
    default=None,
    metavar="PACKAGE.MODULE:FUNCTION",
    help="The student's own factory, when it was trained from one: a student directory "
    "names its model but never runs code, so you name the code you trust.",
)
@params_option
@overwrite_option
@friendly_errors
def export(student, out, fmt, check_rows, opset, model, params, overwrite) -> None:
    """Export a student to TorchScript or ONNX; outputs are checked equal to PyTorch's."""
    from pipeline.core.config import ExportConfig
    from stages import export as stage

    cfg = resolve_config(
        ExportConfig,
        params,
        "export",
        given(format=fmt, check_rows=check_rows, opset=opset, model=model),
    )
    result = stage.run(cfg, Path(student), Path(out), overwrite=overwrite)
    click.echo(
        f"{result['format']} written to {out} (matches PyTorch on batches "
        f"{result['checked_batches']}: max |diff| {result['max_abs_diff']:.2g})"
    )
