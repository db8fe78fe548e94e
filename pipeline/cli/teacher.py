"""Stage one's commands: train-teacher, precompute-logits, layers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from pipeline.cli.common import (
    ConfigCommand,
    device_option,
    epoch_summary,
    friendly_errors,
    given,
    load_json_option,
    optim_options,
    optim_values,
    overwrite_option,
    params_option,
    resolve_config,
    seed_option,
    threads_option,
)


@click.command("train-teacher", cls=ConfigCommand, config="pipeline.core.config:TrainTeacherConfig")
@click.option("--data", required=True, help="Labelled transfer set, e.g. digits:train.")
@click.option(
    "--model",
    default=None,
    help="Registry model name (see `pipeline models`) or package.module:function.",
)
@click.option(
    "--model-kwargs", default=None, help="Model arguments as JSON, e.g. '{\"hidden\": [256]}'."
)
@optim_options
@seed_option
@device_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@params_option
@overwrite_option
@friendly_errors
def train_teacher(
    data, model, model_kwargs, seed, device, out, params, overwrite, **options
) -> None:
    """Train a teacher on a labelled split and save a checkpoint (weights + config)."""
    from pipeline.core.config import TrainTeacherConfig
    from pipeline.core.runrecord import read_record
    from pipeline.models.checkpoint import load_checkpoint
    from stages import train_teacher as stage

    cli_values = given(
        model=model,
        model_kwargs=load_json_option(model_kwargs, "--model-kwargs"),
        seed=seed,
        device=device,
        **optim_values(options),
    )
    cfg = resolve_config(TrainTeacherConfig, params, "train_teacher", cli_values)
    path = stage.run(cfg, data, Path(out), overwrite=overwrite)
    _, meta = load_checkpoint(path, code=cfg.model)  # the --model just named, if code
    click.echo(f"teacher written to {path} ({epoch_summary(meta, read_record(path))})")


@click.command(
    "precompute-logits", cls=ConfigCommand, config="pipeline.core.config:PrecomputeConfig"
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    help="A train-teacher checkpoint, a TorchScript file, an ONNX model (.onnx; needs the onnx "
    "extra) or package.module:function[@weights.pt]; repeat for an ensemble. Default: "
    "`teachers` in the params file.",
)
@click.option(
    "--data",
    required=True,
    help="Transfer set NAME:ARG[?options], e.g. digits:train, npz:x.npz, "
    "imagefolder:DIR?size=32 (see `pipeline sources`).",
)
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
@click.option(
    "--compression",
    default=None,
    help="auto (zstd:3 for Zarr; gzip:4 for HDF5, which then opens in any HDF5 reader), "
    "zstd:LEVEL (1-22; HDF5 readers need hdf5plugin), gzip:LEVEL (1-9) or none.",
)
@click.option(
    "--chunk-rows", type=int, default=None, help="Rows per chunk (0: about 2 MiB of logits)."
)
@click.option(
    "--chunks-per-shard",
    type=int,
    default=None,
    help="Chunks per shard, the unit a crashed run resumes from (0: up to 16384 rows).",
)
@click.option(
    "--combine",
    type=click.Choice(["mean-logits", "mean-probs"]),
    default=None,
    help="How members make `logits`: mean of logits, or log of mean probabilities at T = 1.",
)
@click.option(
    "--keep-members",
    is_flag=True,
    default=None,
    help="Also store each member's logits, so students can combine them at their own T.",
)
@click.option("--batch-size", type=int, default=None, help="Teacher inference batch size.")
@click.option(
    "--views",
    type=int,
    default=None,
    help="Views per sample (V): the teachers run on each augmented view and logits are stored "
    "as (N, V, C); more than 1 needs --augment.",
)
@click.option(
    "--augment",
    default=None,
    help="Augmentation of the views: steps KIND[:KEY=VALUE]... joined by commas, applied in "
    "order. crop[:pad=4] and flip[:p=0.5] for (C, H, W) images (zero-padded random crop; "
    "left-right mirror), shift:max=M for (L,), (C, L) signals and images (random integer "
    "shift, zero-filled), noise:std=S for any input (Gaussian). E.g. 'crop:pad=4,flip', "
    "'shift:max=2,noise:std=0.05'. '' or none: the raw inputs.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of the views: view v of sample i is seeded by (seed, sample id, v) alone, "
    "stored as views/seed.",
)
@click.option(
    "--features",
    multiple=True,
    help="A feature target NAME=LAYER:KIND[:KEY=VALUE,...], repeatable, stored per view as "
    "features/NAME: attention[:p=2] (AT map), hint[:dtype=float16] (raw activation), "
    "fsp with LAYER_A,LAYER_B (FSP matrix), input-grad[:k=1,t=1] and grad-attention with "
    "LAYER input (gradients). LAYER: a module path (`pipeline layers TEACHER`). E.g. "
    "att3=2:attention, sob=input:input-grad:k=2,t=4.",
)
@click.option(
    "--topk",
    type=int,
    default=None,
    help="Sparse targets: store per view only the K largest raw logits (float32), their "
    "classes and the exact log-sum-exp of all C, not the full logits; students rebuild the "
    "target at any T (tail spread evenly). 0: full logits. E.g. --topk 50.",
)
@click.option(
    "--sample-k",
    type=int,
    default=None,
    help="Sparse targets, unbiased at T = 1 (Anshumann et al. 2025): draw K classes per view "
    "from the teacher's distribution and store the classes drawn and their counts, not the "
    "logits. E.g. --sample-k 64.",
)
@click.option(
    "--sample-values/--no-sample-values",
    default=None,
    help="With --sample-k: also store the drawn classes' raw logits, which students need to "
    "train at a temperature other than 1.",
)
@click.option(
    "--max-cache-size",
    default=None,
    help="Refuse a cache projected larger than this (before compression), e.g. 20GiB. "
    "[default: half the free disk space where --out goes]",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Run torch teachers under autocast in bf16 or fp16 (faster on recent GPUs); the "
    "logits are stored as --dtype says. fp32 is exact. ONNX teachers run as exported.",
)
@threads_option
@device_option
@params_option
@overwrite_option
@friendly_errors
def precompute_logits(
    teachers, data, out, fmt, keep_members, features, max_cache_size, params, overwrite, **options
) -> None:
    """Run the teacher(s) once over a transfer set and cache raw logits with provenance.

    With --augment the teachers see --views augmented views of every sample; each view's seed
    is stored so training regenerates exactly that view, e.g.
    `pipeline precompute-logits --teacher t.pt --data cifar10:DIR --out c.zarr --views 4
    --augment crop:pad=4,flip`.

    With --features it caches the teacher's intermediate targets too, per view, e.g.
    `--features att=3:attention --features sob=input:input-grad:k=2`. The projected size of
    every node is printed before the run. For many classes, `--topk 50` keeps only the 50
    largest logits per view and the log-sum-exp of all. Re-running the same command after a
    crash resumes from the finished shards.
    """
    from pipeline.core.config import PrecomputeConfig
    from stages import precompute_logits as stage

    # The other options are named as their PrecomputeConfig keys (dtype, views, topk, ...).
    cli_values = given(
        teachers=list(teachers) or None,
        format=fmt,
        keep_members=keep_members or None,
        features=list(features) or None,
        **options,
    )
    from pipeline.cache.store import location

    cfg = resolve_config(PrecomputeConfig, params, "precompute_logits", cli_values)
    path = stage.run(
        cfg, cfg.teachers, data, location(out), overwrite=overwrite, max_cache_size=max_cache_size
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        click.echo(f"cache written to {path}")


# What a student trains on: labels, held-out rows, views, feature targets, the cache's join.


@click.command("layers")
@click.argument("teacher")
@click.option(
    "--data",
    default="digits:train",
    show_default=True,
    help="Transfer set whose first rows the teacher is run on (only their shape matters).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@friendly_errors
def layers(teacher, data, as_json) -> None:
    """List a teacher's layers: module path, type and output shape per sample on one batch of
    --data, the LAYER that --features NAME=LAYER:KIND names (`input` for the gradient kinds).

    TEACHER is any --teacher form; a teacher trained from your own factory is
    package.module:function@checkpoint.pt (the checkpoint never runs code by itself).

    \b
    Examples:
      pipeline layers models/teacher.pt --data digits:train
      pipeline layers mycode:net@models/teacher.pt
    """
    from stages import layers as stage

    rows = stage.run(teacher, data)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["path"]) for r in rows)
    kinds = max(len(r["type"]) for r in rows)
    for r in rows:
        shape = "- (did not run)" if r["shape"] is None else str(tuple(r["shape"]))
        calls = f"  (runs {r['calls']} times per forward)" if r["calls"] > 1 else ""
        click.echo(f"{r['path']:<{width}}  {r['type']:<{kinds}}  {shape}{calls}")
