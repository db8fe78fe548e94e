"""The `pipeline` command: one thin command per stage.

Each command parses options, resolves its config (defaults → params.yaml section → explicit
options) and calls `stages.<stage>.run` (the listing commands call the library directly).
The commands live in one module per stage (`teacher`, `cache`, `student`, `evaluate`,
`report`) and two more (`lists`, `params`); `COMMANDS` names where each is, and only the
module of the command that runs is imported. So a DVC stage depends on its
own command module, and `pipeline --help` imports neither torch nor any command module.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import click

from pipeline import __version__
from pipeline.cli.common import DEBUG_ENV

# name: (module in pipeline.cli, function, one line for `pipeline --help`, which click would
# otherwise cut from the docstring's first sentence).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train-teacher": ("teacher", "train_teacher", "Train a teacher on a labelled split."),
    "precompute-logits": (
        "teacher",
        "precompute_logits",
        "Run the teacher(s) once; cache raw logits.",
    ),
    "layers": ("teacher", "layers", "List a teacher's layers and output shapes."),
    "train-student": (
        "student",
        "train_student",
        "Train a student from a cache, at any T and loss.",
    ),
    "train-students": ("student", "train_students", "Train a sweep of students in one process."),
    "check-params": ("params", "check_params", "Check every section of a params.yaml."),
    "evaluate": ("evaluate", "evaluate", "Score a student on the test split (metrics.json)."),
    "export": ("evaluate", "export", "Export a student to TorchScript or ONNX."),
    "report": ("report", "report", "Summary table and plots of every student."),
    "show-targets": (
        "report",
        "show_targets",
        "Plot a sample's teacher distribution at several T.",
    ),
    "inspect": ("cache", "inspect", "Show a cache's shapes, storage and provenance."),
    "verify": ("cache", "verify", "Check a cache: checksums, NaN/Inf, data, teacher."),
    "convert-cache": ("cache", "convert_cache", "Convert a cache between Zarr and HDF5."),
    "models": ("lists", "models", "List the model registry with parameter counts."),
    "losses": ("lists", "losses", "List the losses with their settings and papers."),
    "sources": ("lists", "sources", "List the --data sources and their options."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs or shows help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, function, short = COMMANDS[name]
        command = getattr(importlib.import_module(f"pipeline.cli.{module}"), function)
        command.short_help = short
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, short) for name, (_, _, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    # A usage error (unknown option, bad value, missing argument) is one line that names
    # the command's --help, rather than click's usage block, hint, blank line and error.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise _one_line(e) from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from e


def _one_line(e: click.UsageError) -> click.ClickException:
    line = " ".join(e.format_message().split())
    if e.ctx is not None:
        end = "" if re.search(r"[.?!]\)?$", line) else "."  # "...?)" ends a sentence too
        line = f"{line}{end} See '{e.ctx.command_path} --help'."
    one = click.ClickException(line)
    one.exit_code = e.exit_code
    return one


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def main() -> None:
    cli(prog_name="pipeline")
