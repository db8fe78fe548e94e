"""Stage two's commands: train-student, train-students."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.cli.common import (
    ConfigCommand,
    _apply,
    comma_list,
    device_option,
    friendly_errors,
    given,
    load_json_option,
    optim_options,
    optim_values,
    overwrite_option,
    params_option,
    seed_option,
    trained_summary,
)
from pipeline.core.errors import PipelineError

_TARGET_OPTIONS = [
    click.option(
        "--labeled-fraction",
        type=float,
        default=None,
        help="Keep labels for this seeded fraction of rows; the rest get -1.",
    ),
    click.option(
        "--holdout",
        type=float,
        default=None,
        help="Hold this seeded fraction of the labelled rows out of training and report "
        "its accuracy after every epoch (0: train on every row).",
    ),
    click.option(
        "--views",
        type=int,
        default=None,
        help="Views of an augmented cache to train on, the first N (0: all): epoch e uses "
        "view (e + offset) mod N of each sample, its input regenerated from the view's seed.",
    ),
    click.option(
        "--feature-loss",
        "feature_losses",
        multiple=True,
        metavar="LOSS:FEATURE[=LAYER][:KEY=VALUE,...]",
        help="A feature loss added to the logit loss (repeatable), e.g. at:att=5 (AT on the "
        "cache's feature att against the student's layer 5), fitnet:hint=5, nst:hint=5, "
        "fsp:g=2+5, sobolev:grad. `pipeline losses` lists them; `pipeline layers` on a "
        "student checkpoint lists its layers.",
    ),
    click.option(
        "--cross-modal",
        is_flag=True,
        default=None,
        help="Teacher saw another modality of the same samples: join by sample ids only.",
    ),
]


def training_options(fn):
    """Options shared by train-student and train-students: optimizer, schedule, data, memory."""
    options = [
        optim_options,
        *_TARGET_OPTIONS,
        click.option(
            "--cache-memory",
            default=None,
            help="Hold targets in memory up to this size, else stream them "
            "shard by shard through a shuffle buffer of this size.",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue from the per-epoch checkpoint (OUT.resume.pt) of an interrupted run.",
        ),
        seed_option,
        device_option,
        params_option,
        overwrite_option,
    ]
    return _apply(options, fn)


def training_values(o: dict[str, Any]) -> dict[str, Any]:
    """The config values given by `training_options` (popped from the command's kwargs)."""
    return given(
        **optim_values(o),
        labeled_fraction=o.pop("labeled_fraction"),
        holdout=o.pop("holdout"),
        views=o.pop("views"),
        feature_losses=list(o.pop("feature_losses")) or None,
        cross_modal=o.pop("cross_modal") or None,
        cache_memory=o.pop("cache_memory"),
        seed=o.pop("seed"),
        device=o.pop("device"),
    )


def loss_args(alpha: float | None, beta: float | None, gamma: float | None, pairs: tuple[str, ...]):
    """Loss settings from the command line as (where, key, value): --alpha/--beta/--gamma,
    then each --loss-arg NAME=VALUE."""
    args = [(f"--{k}", k, v) for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma))]
    args = [a for a in args if a[2] is not None]
    for pair in pairs:
        key, eq, text = pair.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = None
        if not eq or not key.strip() or value is None:
            raise PipelineError(f"--loss-arg {pair!r}: expected NAME=NUMBER, e.g. alpha=0.5")
        args.append((f"--loss-arg {key.strip()}", key.strip(), value))
    seen: dict[str, str] = {}
    for where, key, _ in args:  # two values for one setting: which one was meant?
        if key in seen:
            raise PipelineError(f"{where}: {key} is already set by {seen[key]}")
        seen[key] = where
    return args


@click.command(
    "train-student", cls=ConfigCommand, config="pipeline.student.students:TrainStudentConfig"
)
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache of the train split.")
@click.option("--data", required=True, help="Transfer set the cache was built from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Student directory.")
@click.option(
    "--name",
    default=None,
    help="Student preset: overlays students.NAME from --params on train_student.",
)
@click.option(
    "--student",
    "model",
    default=None,
    help="Student model: a registry name (`pipeline models`) or package.module:function, "
    "called with num_classes and input_shape when it takes them; for sequence data (where "
    "it must be given) a causal model (gpt_nano, gpt_micro, gpt_mini, causal_transformer) or "
    "a Hugging Face config directory.",
)
@click.option("--model-kwargs", default=None, help="Student model arguments as JSON.")
@click.option(
    "--loss",
    default=None,
    help="kd, soft, mse, dkd, dist, ce (the baseline), or package.module:function "
    "(`pipeline losses` lists them with their settings); for sequence data (language "
    "models), a token loss: kl, kl-topk, reverse-kl, jsd (top-k caches), kl-sampled (sampled "
    "caches), or ce; kl when not given.",
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="Softmax temperature T (> 0); for sequence data 1 when not given.",
)
@click.option(
    "--loss-arg",
    "loss_arg",
    multiple=True,
    metavar="NAME=VALUE",
    help="A setting of the loss, e.g. alpha=0.5 (repeatable; `pipeline losses` lists them).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Same as --loss-arg alpha=A. kd, mse: weight of the teacher term; dkd: TCKD weight.",
)
@click.option(
    "--beta", type=float, default=None, help="Same as --loss-arg beta=B (dkd: NCKD; dist)."
)
@click.option("--gamma", type=float, default=None, help="Same as --loss-arg gamma=G (dist).")
@click.option(
    "--combine",
    type=click.Choice(["mean-logits", "mean-probs"]),
    default=None,
    help="Ensemble cache with members: average logits, or probabilities at T.",
)
@training_options
@friendly_errors
def train_student(
    cache, data, out, name, model, model_kwargs, loss, temperature, **options
) -> None:
    """Train a student from a teacher cache at any temperature; the teacher is never loaded."""
    from pipeline.core.config import load_params
    from pipeline.core.distributed import from_env
    from pipeline.student.students import resolve_student
    from stages import train_student as stage

    params, overwrite, resume = (options.pop(k) for k in ("params", "overwrite", "resume"))
    cli_values = given(
        model=model,
        model_kwargs=load_json_option(model_kwargs, "--model-kwargs"),
        loss=loss,
        temperature=temperature,
        combine=options.pop("combine"),
        **training_values(options),
    )
    settings = loss_args(
        options.pop("alpha"), options.pop("beta"), options.pop("gamma"), options.pop("loss_arg")
    )
    from pipeline.cache.store import location
    from pipeline.data.sequences import is_sequence_spec

    cfg = resolve_student(load_params(params), params, name, cli_values, settings,
                          sequences=is_sequence_spec(data))  # fmt: skip
    path = stage.run(
        cfg, location(cache), data, Path(out), name=name, overwrite=overwrite, resume=resume
    )
    if from_env().main:  # under torchrun, rank 0 speaks for every rank
        click.echo(f"student written to {path} ({trained_summary(path)})")


@click.command(
    "train-students", cls=ConfigCommand, config="pipeline.student.students:TrainStudentConfig"
)
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache of the train split.")
@click.option("--data", required=True, help="Transfer set the cache was built from.")
@click.option(
    "--out-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the students: one STUDENT-LOSS-tT (and STUDENT-ce) each.",
)
@click.option(
    "--students",
    default=None,
    help="Comma-separated keys of `students` in --params (or registry model names); "
    "default: sweep.students.",
)
@click.option("--losses", default=None, help="Comma-separated losses; default: sweep.losses.")
@click.option(
    "--temperatures",
    default=None,
    help="Comma-separated temperatures; default: sweep.temperatures.",
)
@click.option(
    "--baseline/--no-baseline", default=True, help="Also train a CE baseline per student."
)
@click.option(
    "--spread",
    type=click.Choice(["students", "batches"]),
    default=None,
    help="Under torchrun: students: rank r trains students r, r+N, ... each alone (faster "
    "for small models); batches: every student on all ranks (DDP). Default: sweep.spread, "
    "else students.",
)
@training_options
@friendly_errors
def train_students(
    cache, data, out_dir, students, losses, temperatures, baseline, spread, **options
) -> None:
    """Train a sweep of students in one process, from one loaded cache and one data pipeline.

    Students × losses × temperatures (the `sweep` section of --params, as the DVC matrix), each
    configured like `train-student --name STUDENT --loss LOSS --temperature T`. Students that
    share epochs, batch size, seed and labels train in lockstep on the same batches. Under
    torchrun, --spread says how the ranks share the sweep.
    """
    from pipeline.core.config import SweepConfig, layered, load_params
    from pipeline.student.sweep import plan as plan_sweep
    from stages import train_students as stage

    params, overwrite, resume = (options.pop(k) for k in ("params", "overwrite", "resume"))
    common = training_values(options)
    sweep_options = given(
        students=comma_list(students, "--students"),
        losses=comma_list(losses, "--losses"),
        temperatures=comma_list(temperatures, "--temperatures", float),
        spread=spread,
    )
    values = load_params(params)
    sweep = layered(SweepConfig, values, params, "sweep", sweep_options)
    plan = plan_sweep(values, params, sweep, common, Path(out_dir), baseline)
    from pipeline.cache.store import location

    skipped = {s.out for s in plan if resume and not overwrite and s.out.exists()}
    paths = stage.run(plan, location(cache), data, overwrite, resume, sweep.spread)
    for path in paths:  # under torchrun, each rank reports what it wrote (stage.run)
        if path in skipped:
            click.echo(f"student already done, skipped: {path}")
        else:
            click.echo(f"student written to {path} ({trained_summary(path)})")
