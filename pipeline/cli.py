"""The `pipeline` command: one thin command per stage.

Each command parses options, resolves its config (defaults → params.yaml section → explicit
options) and calls `stages.<stage>.run`. Heavy imports (torch, zarr) happen inside commands so
`pipeline --help` stays fast.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import PipelineError

PARAMS_HELP = "params.yaml to read this stage's section from (defaults → section → options)."


def friendly_errors(fn):
    """Turn expected failures into one-line errors with a non-zero exit, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def given(**options: Any) -> dict[str, Any]:
    """The options the user actually passed (None means not given)."""
    return {k: v for k, v in options.items() if v is not None}


def resolve_config(cls, params: str | None, section_name: str, cli: dict[str, Any], extra=()):
    """Config `cls` from defaults, then the params section, then `extra` layers, then options."""
    from pipeline.config import load_params, resolve, section

    values = load_params(params)
    where = params or "params.yaml"
    layers = [(f"{where}:{section_name}", section(values, section_name, where))]
    layers += list(extra)
    layers.append(("command line", cli))
    return resolve(cls, *layers)


def load_json_option(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise PipelineError(f"{option}: expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{option}: expected a JSON object, got {text!r}")
    return value


params_option = click.option(
    "--params", type=click.Path(dir_okay=False), default=None, help=PARAMS_HELP
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing output (only once the new one is done)."
)
device_option = click.option(
    "--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N."
)
seed_option = click.option("--seed", type=int, default=None, help="Random seed (recorded).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kd-pipeline")
def cli() -> None:
    """Offline knowledge distillation: run the teacher once, distil many students.

    \b
    Typical flow (what `dvc repro` runs from dvc.yaml and params.yaml):
      pipeline train-teacher --data digits:train --out models/teacher.pt
      pipeline precompute-logits --teacher models/teacher.pt \\
          --data digits:train --out caches/train.zarr
      pipeline train-student --cache caches/train.zarr \\
          --data digits:train --out students/kd
      pipeline evaluate --student students/kd --cache caches/test.zarr \\
          --data digits:test --out metrics/kd.json
      pipeline report --metrics metrics --out reports/summary.md
    """


@cli.command("train-teacher")
@click.option("--data", required=True, help="Labelled transfer set, e.g. digits:train.")
@click.option("--model", default=None, help="Registry model name (see `pipeline models`).")
@click.option(
    "--model-kwargs", default=None, help="Model arguments as JSON, e.g. '{\"hidden\": [256]}'."
)
@click.option("--epochs", type=int, default=None, help="Training epochs.")
@click.option("--batch-size", type=int, default=None, help="Batch size.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (cosine schedule).")
@seed_option
@device_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@params_option
@overwrite_option
@friendly_errors
def train_teacher(
    data, model, model_kwargs, epochs, batch_size, lr, seed, device, out, params, overwrite
) -> None:
    """Train a teacher on a labelled split and save a checkpoint (weights + config)."""
    from pipeline.config import TrainTeacherConfig
    from stages import train_teacher as stage

    cli_values = given(
        model=model,
        model_kwargs=load_json_option(model_kwargs, "--model-kwargs"),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    cfg = resolve_config(TrainTeacherConfig, params, "train_teacher", cli_values)
    path = stage.run(cfg, data, Path(out), overwrite=overwrite)
    click.echo(f"teacher written to {path}")


@cli.command("precompute-logits")
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    required=True,
    help="Teacher checkpoint; repeat for an ensemble (logits are averaged).",
)
@click.option("--data", required=True, help="Transfer set, e.g. digits:train.")
@click.option("--out", required=True, type=click.Path(), help="Cache path: DIR.zarr or FILE.h5.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "zarr", "hdf5"]),
    default=None,
    help="Storage backend; auto picks hdf5 for .h5/.hdf5 paths, else zarr.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Stored logits dtype.",
)
@click.option("--compression", default=None, help="zstd:LEVEL (1-22) or none.")
@click.option("--chunk-rows", type=int, default=None, help="Rows per chunk (0: about 2 MiB).")
@click.option("--chunks-per-shard", type=int, default=None, help="Chunks per Zarr shard file.")
@click.option("--batch-size", type=int, default=None, help="Teacher inference batch size.")
@device_option
@params_option
@overwrite_option
@friendly_errors
def precompute_logits(
    teachers,
    data,
    out,
    fmt,
    dtype,
    compression,
    chunk_rows,
    chunks_per_shard,
    batch_size,
    device,
    params,
    overwrite,
) -> None:
    """Run the teacher(s) once over a transfer set and cache raw logits with provenance."""
    from pipeline.config import PrecomputeConfig
    from stages import precompute_logits as stage

    cli_values = given(
        format=fmt,
        dtype=dtype,
        compression=compression,
        chunk_rows=chunk_rows,
        chunks_per_shard=chunks_per_shard,
        batch_size=batch_size,
        device=device,
    )
    cfg = resolve_config(PrecomputeConfig, params, "precompute_logits", cli_values)
    path = stage.run(cfg, list(teachers), data, Path(out), overwrite=overwrite)
    click.echo(f"cache written to {path}")


@cli.command("train-student")
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache of the train split.")
@click.option("--data", required=True, help="Transfer set the cache was built from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student directory.")
@click.option(
    "--name",
    default=None,
    help="Student preset: overlays students.NAME from --params on train_student.",
)
@click.option("--student", "model", default=None, help="Student model name from the registry.")
@click.option("--model-kwargs", default=None, help="Student model arguments as JSON.")
@click.option("--loss", default=None, help="kd (Hinton) or ce (labels only, the baseline).")
@click.option("--temperature", type=float, default=None, help="Softmax temperature T (> 0).")
@click.option("--alpha", type=float, default=None, help="Weight a of the KD term, in [0, 1].")
@click.option(
    "--labeled-fraction",
    type=float,
    default=None,
    help="Keep labels for this seeded fraction of rows; the rest get -1.",
)
@click.option(
    "--cross-modal",
    is_flag=True,
    default=None,
    help="Teacher saw another modality of the same samples: join by sample ids only.",
)
@click.option("--epochs", type=int, default=None, help="Training epochs.")
@click.option("--batch-size", type=int, default=None, help="Batch size.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (cosine schedule).")
@seed_option
@device_option
@params_option
@overwrite_option
@friendly_errors
def train_student(
    cache,
    data,
    out,
    name,
    model,
    model_kwargs,
    loss,
    temperature,
    alpha,
    labeled_fraction,
    cross_modal,
    epochs,
    batch_size,
    lr,
    seed,
    device,
    params,
    overwrite,
) -> None:
    """Train a student from a teacher cache at any temperature; the teacher is never loaded."""
    from pipeline.config import TrainStudentConfig, load_params, section
    from stages import train_student as stage

    extra = []
    if name is not None and params is not None:
        students = section(load_params(params), "students", params)
        if name not in students:
            raise click.ClickException(
                f"--name {name}: no students.{name} in {params} "
                f"(have: {', '.join(students) or 'none'})"
            )
        extra.append((f"{params}:students.{name}", students[name] or {}))
    cli_values = given(
        model=model,
        model_kwargs=load_json_option(model_kwargs, "--model-kwargs"),
        loss=loss,
        temperature=temperature,
        alpha=alpha,
        labeled_fraction=labeled_fraction,
        cross_modal=cross_modal or None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    cfg = resolve_config(TrainStudentConfig, params, "train_student", cli_values, extra)
    path = stage.run(cfg, Path(cache), data, Path(out), name=name, overwrite=overwrite)
    click.echo(f"student written to {path}")


@cli.command("evaluate")
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
@device_option
@params_option
@friendly_errors
def evaluate(student, cache, data, out, batch_size, cross_modal, device, params) -> None:
    """Test accuracy, agreement and KL with the teacher, from the test cache."""
    from pipeline.config import EvaluateConfig
    from stages import evaluate as stage

    cfg = resolve_config(
        EvaluateConfig,
        params,
        "evaluate",
        given(batch_size=batch_size, cross_modal=cross_modal or None, device=device),
    )
    result = stage.run(cfg, Path(student), Path(cache), data, Path(out))
    click.echo(
        f"{result['student']}: accuracy {result['accuracy']:.4f}, "
        f"agreement {result['agreement']:.4f} → {out}"
    )


@cli.command("report")
@click.option(
    "--metrics",
    "metrics_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory of evaluate outputs (*.json).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Markdown to write.")
@friendly_errors
def report(metrics_dir, out) -> None:
    """Summarise the teacher and every student in one Markdown table."""
    from stages import report as stage

    path = stage.run(Path(metrics_dir), Path(out))
    click.echo(f"report written to {path}")


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@friendly_errors
def inspect(path, as_json) -> None:
    """Show a cache's shape, dtype, format, completeness, teacher, data and size."""
    from pipeline.cache import describe, open_cache

    with open_cache(path) as cache:
        info = describe(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    logits = info["arrays"].get("logits", {})
    teacher = info.get("teacher") or {}
    data = info.get("data") or {}
    rows = [
        ("path", info["path"]),
        ("format", f"{info['format']} (kd-target-cache v{info.get('format_version')})"),
        ("complete", info.get("complete")),
        ("logits", f"{tuple(logits.get('shape', ()))} {info.get('logits_dtype')}"),
        (
            "samples / views / classes",
            f"{info.get('num_samples')} / {info.get('num_views')} / {info.get('num_classes')}",
        ),
        ("compression", info.get("compression")),
        (
            "teacher",
            ", ".join(
                f"{m['name']} ({m['source']}, sha256 {m['sha256'][:12]})"
                for m in teacher.get("members", [])
            )
            or "-",
        ),
        ("combine", teacher.get("combine", "-")),
        ("data", f"{data.get('spec', '-')} (fingerprint {str(data.get('fingerprint'))[:16]})"),
        ("created", f"{info.get('created_at', '-')} with {info.get('created_with', {})}"),
        ("size on disk", f"{info['size_bytes']:,} bytes"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@cli.command("models")
def models() -> None:
    """List registered model names."""
    from pipeline.models import list_models

    for name in list_models():
        click.echo(name)


def main() -> None:
    cli(prog_name="pipeline")
