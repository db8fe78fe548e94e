"""What every command module shares: one-line errors, config layering, common options."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.core.errors import PipelineError, one_line

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
        except OSError as e:
            if _debugging() or e.errno not in _STORAGE_FAILURES:
                raise _unexpected(e) from None
            what, advice = _STORAGE_FAILURES[e.errno]
            where = f" while writing {e.filename}" if e.filename else ""
            raise click.ClickException(
                f"{what}{where} ({e.strerror}); {advice}: {_what_was_kept()}"
            ) from None
        except Exception as e:
            if _debugging():
                raise
            raise _unexpected(e) from None

    return wrapper


# Failures of the storage under a run (not of its inputs): what happened, and what to do.
_STORAGE_FAILURES = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("no space left on the device", "free some space"),
    errno.EFBIG: ("a file grew past the largest size allowed", "raise the limit (ulimit -f)"),
    errno.EROFS: ("the file system is read-only", "write elsewhere"),
    errno.EIO: ("the device reported an I/O error", "check the disk"),
}


def _unexpected(e: BaseException) -> click.ClickException:
    return click.ClickException(
        f"unexpected error: {one_line(e, limit=300)} (re-run as `pipeline --debug COMMAND "
        f"...` or with {DEBUG_ENV}=1 for the traceback, and please report it)"
    )


# What an interrupted command leaves, and how to go on: the truth for each command (outputs
# are never half written; only these commands keep work to resume from), with the suffix of
# the work file beside OUT that holds it (it says "nothing was finished yet" when absent).
KEPT_ON_INTERRUPT: dict[str, tuple[str | None, str]] = {
    "precompute-logits": (
        ".partial",
        "the finished shards are kept in {work}; run the same command again to resume from them",
    ),
    "train-student": (
        ".resume.pt",
        "the last finished epoch is kept in {work}; run the same command with --resume to "
        "continue from it (dvc.yaml's commands pass --resume)",
    ),
    "train-students": (
        None,
        "finished students are written to {out_dir}, and the last finished epoch of each other "
        "one is kept in its STUDENT.resume.pt there; run the same command with --resume to "
        "continue",
    ),
}


def _what_was_kept() -> str:
    ctx = click.get_current_context(silent=True)
    name, params = (ctx.info_name, ctx.params) if ctx else (None, {})
    suffix, kept = KEPT_ON_INTERRUPT.get(
        name, (None, "nothing was written; run the same command again")
    )
    out = params.get("out")
    work = f"{out or 'OUT'}{suffix}"
    if suffix and out is not None and "://" not in str(out) and not Path(work).exists():
        return f"nothing was finished yet (no {work}); run the same command again"
    return kept.format(work=work, out_dir=params.get("out_dir", "OUT_DIR"))


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
    from pipeline.core.config import layered, load_params

    return layered(cls, load_params(params), params, section_name, cli)


def trained_summary(student: Path) -> str:
    """The last epoch of a trained student, on one line: loss, held-out (else train)
    accuracy, time."""
    from pipeline.core.runrecord import read_record

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
