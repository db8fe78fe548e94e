"""The `pipeline` command: one thin command per stage.

Each command parses options, resolves its config (defaults → params.yaml section → explicit
options) and calls `stages.<stage>.run`. Heavy imports (torch, zarr) happen inside commands so
`pipeline --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import PipelineError, one_line

THREADS_HELP = (
    "CPU threads for torch (0: 1 for models under 1 MFLOPs per sample, else every core but "
    "one, or OMP_NUM_THREADS; recorded in OUT's run record)."
)
PARAMS_HELP = "params.yaml to read this stage's section from (defaults → section → options)."


DEBUG_ENV = "PIPELINE_DEBUG"  # =1: tracebacks instead of one-line errors (as --debug)


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    return os.environ.get(DEBUG_ENV) == "1" or bool(ctx and ctx.meta.get("kd_debug"))


def friendly_errors(fn):
    """Turn failures into one-line errors with a non-zero exit and no traceback (unless
    --debug): expected ones say what to fix; anything else says it was unexpected."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: {_what_was_kept()}", err=True)
            raise SystemExit(130) from None
        except BrokenPipeError:  # `pipeline inspect C | head`: the reader has gone, as it may
            _silence_stdout()
            raise SystemExit(141) from None
        except PipelineError as e:
            if _debugging():
                raise
            raise click.ClickException(_rank_prefix() + " ".join(str(e).split())) from None
        except Exception as e:
            if _debugging():
                raise
            raise click.ClickException(
                f"unexpected error: {one_line(e, limit=300)} (re-run with --debug or "
                f"{DEBUG_ENV}=1 for the traceback, and please report it)"
            ) from None

    return wrapper


# What an interrupted command leaves, and how to go on: the truth for each command (outputs
# are never half written; only these two commands keep work to resume from).
KEPT_ON_INTERRUPT = {
    "precompute-logits": "the finished shards are kept in {out}.partial; run the same command "
    "again to resume from them",
    "train-student": "the last finished epoch is kept in {out}.resume.pt; run the same command "
    "with --resume to continue from it (dvc.yaml's commands pass --resume)",
    "train-students": "finished students are written to {out_dir}, and the last finished epoch "
    "of each other one is kept in its STUDENT.resume.pt there; run the same command with "
    "--resume to continue",
}


def _what_was_kept() -> str:
    ctx = click.get_current_context(silent=True)
    name, params = (ctx.info_name, ctx.params) if ctx else (None, {})
    kept = KEPT_ON_INTERRUPT.get(name, "nothing was written; run the same command again")
    return kept.format(out=params.get("out", "OUT"), out_dir=params.get("out_dir", "OUT_DIR"))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush into a closed pipe
    prints nothing more."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (an embedding caller)
        pass


def _rank_prefix() -> str:
    """Under torchrun with several ranks, "rank R: ", so that the same error printed by every
    rank reads as one error per rank, and one rank's own failure says which."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '0')}: " if world not in ("", "1") else ""


class ConfigCommand(click.Command):
    """A command whose --help shows each option's default, read from its config dataclass
    (`config`, as "module:Class") only when help is asked for: the options themselves
    default to None, so that params.yaml can fill what the command line leaves out."""

    def __init__(self, *args: Any, config: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config = config

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        import dataclasses
        import importlib

        module, _, name = self.config.partition(":")
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(getattr(importlib.import_module(module), name))
            if f.default is not dataclasses.MISSING
        }
        for p in self.params:
            value = defaults.get(p.name)
            shown = isinstance(p, click.Option) and "[default:" in (p.help or "")
            if isinstance(p, click.Option) and p.default is None and not p.is_flag and not shown:
                if value not in (None, "") and not isinstance(value, bool):
                    p.help = f"{p.help or ''}  [default: {value}]"
        super().format_options(ctx, formatter)


def given(**options: Any) -> dict[str, Any]:
    """The options the user actually passed (None means not given)."""
    return {k: v for k, v in options.items() if v is not None}


def resolve_config(cls, params: str | None, section_name: str, cli: dict[str, Any]):
    """Config `cls` from defaults, then the params file's section, then the options."""
    from pipeline.config import layered, load_params

    return layered(cls, load_params(params), params, section_name, cli)


def trained_summary(student: Path) -> str:
    """The last epoch of a trained student, on one line: loss, held-out (else train)
    accuracy, time."""
    from pipeline.runrecord import read_record

    info = json.loads((Path(student) / "student.json").read_text())
    return epoch_summary(info, read_record(student), f"({info.get('heldout_rows')} rows)")


def epoch_summary(info: dict[str, Any], run: dict[str, Any], rows: str = "") -> str:
    """`info`'s last log row (a student's or a teacher's metadata) and the time in its run
    record `run`, as one line."""
    final, seconds = info.get("final") or (info.get("log") or [{}])[-1], run.get("seconds")
    parts = [f"epoch {final.get('epoch')}: loss {final.get('loss', float('nan')):.4f}"]
    heldout, train = final.get("heldout_accuracy"), final.get("train_accuracy")
    if heldout is not None:
        parts.append(f"held-out accuracy {heldout:.3f} {rows}".rstrip())
    elif train is not None and train == train:  # NaN when no row is labelled
        held = " (no held-out rows)" if info.get("role") == "student" else ""
        parts.append(f"train accuracy {train:.3f}{held}")
    if seconds is not None:
        threads = f" on {run['threads']} thread(s)" if run.get("threads") else ""
        parts.append(f"{seconds:.1f} s{threads}")
    return ", ".join(parts)


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
threads_option = click.option("--threads", type=int, default=None, help=THREADS_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kd-pipeline")
@click.option(
    "--debug", is_flag=True, help=f"Show the full traceback of a failure (or set {DEBUG_ENV}=1)."
)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
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
    ctx.meta["kd_debug"] = debug


def comma_list(text: str | None, option: str, kind=str) -> list | None:
    """'a,b,c' → [a, b, c] converted by `kind`; None stays None."""
    if text is None:
        return None
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        what = {int: "integers", float: "numbers"}.get(kind, "values")
        raise PipelineError(f"{option}: expected comma-separated {what}, got {text!r}") from None


def _apply(options: list, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def optim_options(fn):
    """Optimizer, schedule, epochs and batch size: shared by train-teacher and the students."""
    return _apply(
        [
            click.option(
                "--optimizer",
                type=click.Choice(["adamw", "sgd"]),
                default=None,
                help="Optimizer.",
            ),
            click.option("--lr", type=float, default=None, help="Peak learning rate."),
            click.option("--momentum", type=float, default=None, help="SGD momentum."),
            click.option("--weight-decay", type=float, default=None, help="Weight decay."),
            click.option(
                "--schedule",
                type=click.Choice(["cosine", "step", "constant"]),
                default=None,
                help="Learning-rate schedule: cosine (per step, to 0), step, or constant.",
            ),
            click.option(
                "--milestones",
                default=None,
                help="Step schedule: epochs where lr is multiplied by --lr-decay, e.g. 150,180.",
            ),
            click.option("--lr-decay", type=float, default=None, help="Step schedule factor."),
            click.option("--epochs", type=int, default=None, help="Training epochs."),
            click.option("--batch-size", type=int, default=None, help="Batch size."),
            click.option(
                "--precision",
                type=click.Choice(["fp32", "bf16", "fp16"]),
                default=None,
                help="Mixed precision (autocast) for the forward pass and loss; fp16 adds a "
                "gradient scaler. bf16 suits recent GPUs and CPUs; fp32 is exact.",
            ),
            threads_option,
        ],
        fn,
    )


def optim_values(o: dict[str, Any]) -> dict[str, Any]:
    """The config values given by `optim_options` (popped from the command's kwargs)."""
    return given(
        optimizer=o.pop("optimizer"),
        lr=o.pop("lr"),
        momentum=o.pop("momentum"),
        weight_decay=o.pop("weight_decay"),
        schedule=o.pop("schedule"),
        milestones=comma_list(o.pop("milestones"), "--milestones", int),
        lr_decay=o.pop("lr_decay"),
        epochs=o.pop("epochs"),
        batch_size=o.pop("batch_size"),
        precision=o.pop("precision"),
        threads=o.pop("threads"),
    )


@cli.command("train-teacher", cls=ConfigCommand, config="pipeline.config:TrainTeacherConfig")
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
    from pipeline.checkpoint import load_checkpoint
    from pipeline.config import TrainTeacherConfig
    from pipeline.runrecord import read_record
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


@cli.command("precompute-logits", cls=ConfigCommand, config="pipeline.config:PrecomputeConfig")
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
    from pipeline.config import PrecomputeConfig
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


@cli.command("train-student", cls=ConfigCommand, config="pipeline.students:TrainStudentConfig")
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
    "called with num_classes and input_shape when it takes them.",
)
@click.option("--model-kwargs", default=None, help="Student model arguments as JSON.")
@click.option(
    "--loss",
    default=None,
    help="kd, soft, mse, dkd, dist, ce (the baseline), or package.module:function "
    "(`pipeline losses` lists them with their settings).",
)
@click.option("--temperature", type=float, default=None, help="Softmax temperature T (> 0).")
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
    from pipeline.config import load_params
    from pipeline.distributed import from_env
    from pipeline.students import resolve_student
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

    cfg = resolve_student(load_params(params), params, name, cli_values, settings)
    path = stage.run(
        cfg, location(cache), data, Path(out), name=name, overwrite=overwrite, resume=resume
    )
    if from_env().main:  # under torchrun, rank 0 speaks for every rank
        click.echo(f"student written to {path} ({trained_summary(path)})")


@cli.command("check-params")
@click.option(
    "--params", required=True, type=click.Path(dir_okay=False), help="The params file to check."
)
@friendly_errors
def check_params(params) -> None:
    """Check every section of a params file as the stages will read it: unknown keys, wrong
    types, values out of range, students, losses. dvc.yaml runs it first, so a typo stops
    `dvc repro` before DVC deletes any stage's outputs."""
    from stages import check_params as stage

    names = stage.run(params)
    click.echo(f"{params}: ok (every section; {len(names)} students in the sweep)")


@cli.command("train-students", cls=ConfigCommand, config="pipeline.students:TrainStudentConfig")
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
    from pipeline.config import SweepConfig, layered, load_params
    from pipeline.sweep import plan as plan_sweep
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


@cli.command("evaluate", cls=ConfigCommand, config="pipeline.config:EvaluateConfig")
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
    from pipeline.config import EvaluateConfig
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
    acc = result["accuracy"]
    click.echo(
        f"{result['student']}: accuracy {'–' if acc is None else f'{acc:.4f}'}, "
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
    from pipeline.config import SweepConfig, layered, load_params
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


@cli.command("export", cls=ConfigCommand, config="pipeline.config:ExportConfig")
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
    from pipeline.config import ExportConfig
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


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@friendly_errors
def inspect(path, as_json) -> None:
    """Show a cache: shapes and bytes per sample of every node, storage, completeness, its
    feature targets and all its provenance (teachers' sha256, data fingerprint, resolved
    params, versions, creation time)."""
    from pipeline.cache import describe, open_cache
    from pipeline.cache.reader import describe_lines

    with open_cache(path) as cache:
        info = describe(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    rows = describe_lines(info)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@cli.command("layers")
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


@cli.command("show-targets")
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


def _shards_read(summary: dict[str, Any]) -> str:
    """"every node read, all 12 shard(s)": shards counted as inspect counts them."""
    return f"every node read, all {summary['num_shards']} shard(s)"


@cli.command("verify")
@click.argument("cache", type=click.Path())
@click.option(
    "--data", default=None, help="Transfer set the cache must have been built from (fingerprint)."
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    help="Recompute --sample random rows with these teachers (as given to precompute-logits; "
    "needs --data) and compare them with the stored logits.",
)
@click.option(
    "--sample",
    type=int,
    default=None,
    help="Rows to recompute with --teacher (default 64; every view of each).",
)
@friendly_errors
def verify(cache, data, teachers, sample) -> None:
    """Check a cache: every shard present and readable (checksums), no NaN/Inf, shapes and
    attributes consistent, with --data the data fingerprint, and with --teacher a spot check
    of stored rows against the live teacher."""
    from pipeline.cache.store import location
    from stages import verify as stage

    summary = stage.run(location(cache), data, list(teachers), 64 if sample is None else sample)
    matched = f", fingerprint matches {data}" if data else ""
    checked = summary.get("teacher_rows_checked")
    teacher = f", {checked} sampled rows match --teacher" if checked else ""
    click.echo(
        f"{cache}: ok ({summary['format']}, {summary['num_samples']} samples, "
        f"{_shards_read(summary)}, no NaN/Inf{matched}{teacher})"
    )
    for note in summary.get("notes", []):
        click.echo(f"note: {note}")


@cli.command("convert-cache")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "zarr", "hdf5"]),
    default="auto",
    help="Format of DST; auto picks hdf5 for .h5/.hdf5 paths, else zarr.",
)
@click.option(
    "--compression",
    default="auto",
    show_default=True,
    help="auto: the format's default (zstd:3 for Zarr, gzip:4 for HDF5); keep: the source's; "
    "or zstd:LEVEL, gzip:LEVEL, none.",
)
@overwrite_option
@friendly_errors
def convert_cache(src, dst, fmt, compression, overwrite) -> None:
    """Convert a complete cache between Zarr and HDF5, losslessly (arrays and attributes)."""
    from pipeline.cache.store import location
    from stages import convert_cache as stage

    path = stage.run(
        location(src), location(dst), fmt, overwrite=overwrite, compression=compression
    )
    click.echo(f"cache converted to {path}")


@cli.command("models")
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

        ts = load_transfer_set(data)
        shape = list(ts.input_shape)
        num_classes = len(ts.class_names) if ts.class_names else int(ts.labels.max()) + 1
    if not shape or num_classes < 1 or any(d < 1 for d in shape):
        raise PipelineError("--num-classes and every --input-shape dimension must be >= 1")
    rows = describe_models(num_classes, tuple(shape))
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


@cli.command("losses")
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
    from pipeline.feature_losses import describe_feature_losses
    from pipeline.losses import LOSSES

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


@cli.command("sources")
@friendly_errors
def sources() -> None:
    """List transfer-set sources for --data (NAME:ARG[?key=value&...]) and their options."""
    from pipeline.data import describe_sources

    for name, options, summary in describe_sources():
        click.echo(f"{name:<12} {summary}")
        if options:
            click.echo(f"{'':<12} options: {', '.join(options)}")


# One line each in `pipeline --help` (click would cut the docstrings' first sentences).
SHORT_HELP = {
    "train-teacher": "Train a teacher on a labelled split.",
    "precompute-logits": "Run the teacher(s) once; cache raw logits.",
    "train-student": "Train a student from a cache, at any T and loss.",
    "train-students": "Train a sweep of students in one process.",
    "check-params": "Check every section of a params.yaml.",
    "evaluate": "Score a student on the test split (metrics.json).",
    "report": "Summary table and plots of every student.",
    "export": "Export a student to TorchScript or ONNX.",
    "inspect": "Show a cache's shapes, storage and provenance.",
    "layers": "List a teacher's layers and output shapes.",
    "verify": "Check a cache: checksums, NaN/Inf, data, teacher.",
    "convert-cache": "Convert a cache between Zarr and HDF5.",
    "show-targets": "Plot a sample's teacher distribution at several T.",
    "models": "List the model registry with parameter counts.",
    "losses": "List the losses with their settings and papers.",
    "sources": "List the --data sources and their options.",
}
for _name, _text in SHORT_HELP.items():
    cli.commands[_name].short_help = _text


def main() -> None:
    cli(prog_name="pipeline")
