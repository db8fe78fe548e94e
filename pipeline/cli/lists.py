"""What is registered: models, losses, sources."""

from __future__ import annotations

import json

import click

from pipeline.cli.common import (
    comma_list,
    friendly_errors,
)
from pipeline.core.errors import PipelineError


@click.command("models")
@click.option(
    "--num-classes", type=int, default=10, show_default=True, help="Classes, for the counts."
)
@click.option(
    "--input-shape",
    default="3,32,32",
    show_default=True,
    help="Per-sample input shape C,H,W (or D for flat inputs), for the counts.",
)
@click.option(
    "--data",
    default=None,
    help="Count at this transfer set's input shape and class count instead, e.g. digits:train.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@friendly_errors
def models(num_classes, input_shape, data, as_json) -> None:
    """List registered models with their parameter counts, with each model's default
    arguments, at --num-classes and --input-shape (or at --data's)."""
    from pipeline.models import describe_models

    shape = comma_list(input_shape, "--input-shape", int)
    if data is not None:
        from pipeline.data import load_transfer_set
        from pipeline.data.sequences import is_sequence_spec, load_sequences

        if is_sequence_spec(data):  # language models: (context,) over the vocabulary
            seqs = load_sequences(data)
            shape, num_classes = [seqs.context], seqs.vocab
        else:
            ts = load_transfer_set(data)
            shape = list(ts.input_shape)
            num_classes = len(ts.class_names) if ts.class_names else int(ts.labels.max()) + 1
    if not shape or num_classes < 1 or any(d < 1 for d in shape):
        raise PipelineError("--num-classes and every --input-shape dimension must be >= 1")
    rows = describe_models(num_classes, tuple(shape))
    if data is not None and is_sequence_spec(data):  # the sample models take no token ids
        rows = [r for r in rows if r["tokens"]]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    where = f" ({data})" if data else " (--data DATA counts at your data's)"
    click.echo(
        f"parameters at {num_classes} classes, input {tuple(shape)}{where}, with each model's "
        "default arguments (--model-kwargs changes them)"
    )
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        count = f"{r['params']:>12,}" if r["params"] is not None else f"{'–':>12}"
        click.echo(f"{r['name']:<{width}}  {count}  {r.get('error') or r['summary']}")


TOKEN_SUMMARIES = {
    "kl": "forward KL over the k kept tokens plus one tail bucket (top-k caches)",
    "kl-topk": "forward KL, both sides renormalised over the k kept tokens",
    "reverse-kl": "KL(student || teacher) over the k kept tokens and the tail bucket",
    "jsd": "generalised Jensen-Shannon (beta) over the k kept tokens and the tail bucket",
    "kl-sampled": "from K drawn tokens (--sample-k caches): unbiased gradient at the draws' T",
}


@click.command("losses")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@friendly_errors
def losses(as_json) -> None:
    """List the losses for --loss, with their settings (default, range) and papers.

    \b
    Set them in params.yaml (losses: {kd: {alpha: 0.5}}) or on the command line
    (--loss-arg alpha=0.5). --loss package.module:function uses your own loss:
    fn(student, teacher, labels, *, temperature, margin=0.0) -> scalar tensor, whose
    keyword-only arguments with numeric defaults are its settings.
    """
    from pipeline.student.feature_losses import describe_feature_losses
    from pipeline.student.losses import LOSSES

    rows = [
        {
            "name": spec.name,
            "settings": {
                k: {"default": v.default, "range": v.bounds(), "doc": v.doc}
                for k, v in spec.settings.items()
            },
            "temperature": spec.uses_temperature,
            "teacher": spec.uses_teacher,
            "summary": spec.summary,
            "paper": spec.paper,
        }
        for spec in LOSSES.values()
    ]
    features = describe_feature_losses()
    if as_json:
        click.echo(json.dumps(rows + features, indent=2))
        return
    for r in rows:
        uses = "T, teacher" if r["temperature"] else ("teacher" if r["teacher"] else "labels only")
        click.echo(f"{r['name']:<6} {r['summary']} [{uses}]")
        click.echo(f"{'':<6} {r['paper']}")
        for k, v in r["settings"].items():
            click.echo(f"{'':<6} {k}={v['default']:g} ({v['range']}): {v['doc']}")
    click.echo(
        "\nFeature losses, added to any of the above with --feature-loss LOSS:FEATURE=LAYER:"
    )
    for r in features:
        click.echo(f"{r['name']:<8} reads cached {r['kind']} features; student: {r['student']}")
        click.echo(f"{'':<8} {r['paper']}")
        for k, v in r["settings"].items():
            click.echo(f"{'':<8} {k}={v['default']:g} ({v['range']}): {v['doc']}")
    from pipeline.student.token_losses import TOKEN_LOSSES

    click.echo(
        "\nToken losses, for sequence data (language models, docs/sequences.md; kl at T = 1 "
        "when --loss and --temperature are not given); alpha=0.5 (0-1) weighs each against "
        "cross-entropy, jsd also takes beta=0.5 (0.01-0.99):"
    )
    for name in TOKEN_LOSSES:
        click.echo(f"{name:<10} {TOKEN_SUMMARIES[name]}")


@click.command("sources")
@friendly_errors
def sources() -> None:
    """List transfer-set sources for --data (NAME:ARG[?key=value&...]) and their options."""
    from pipeline.data import describe_sources
    from pipeline.data.sequences import describe_sequence_sources

    for name, options, summary in describe_sources() + describe_sequence_sources():
        click.echo(f"{name:<12} {summary}")
        if options:
            click.echo(f"{'':<12} options: {', '.join(options)}")
