"""The CLI's surface: every stage listed, `python -m pipeline` works, no heavy imports on --help."""

import sys

from tests import procs
from tests.conftest import invoke


def test_help_lists_every_stage(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    for cmd in (
        "train-teacher",
        "precompute-logits",
        "train-student",
        "evaluate",
        "report",
        "inspect",
    ):
        assert cmd in result.output


def test_every_option_has_help(runner):
    from pipeline.cli import COMMANDS, cli

    for name in COMMANDS:
        command = cli.get_command(None, name)
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.opts} has no help"


def test_help_does_not_import_torch_or_zarr():
    code = (
        "import sys\n"
        "from pipeline.cli import cli\n"
        "try:\n    cli(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'zarr', 'h5py', 'sklearn') if m in sys.modules))"
    )
    out = procs.run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_pipeline():
    out = procs.run([sys.executable, "-m", "pipeline", "--version"])
    assert out.returncode == 0, out.stderr
    assert "kd-pipeline" in out.stdout


def test_help_shows_every_default_from_the_config():
    """--help states the defaults; they come from the config dataclasses, so they cannot
    drift from what a run uses."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.core.config import EvaluateConfig, PrecomputeConfig, TrainTeacherConfig
    from pipeline.student.students import TrainStudentConfig

    runner = CliRunner()
    cases = {
        "train-student": [("--epochs", TrainStudentConfig.epochs), ("--loss", "kd"),
                          ("--student", "mlp"), ("--temperature", 4.0), ("--lr", 0.002)],
        "train-teacher": [("--model", TrainTeacherConfig.model), ("--epochs", 30)],
        "precompute-logits": [("--batch-size", PrecomputeConfig.batch_size),
                              ("--compression", "auto")],
        "evaluate": [("--ece-bins", EvaluateConfig.ece_bins), ("--batch-size", 512)],
    }  # fmt: skip
    for command, expected in cases.items():
        text = " ".join(runner.invoke(cli, [command, "--help"], terminal_width=200).output.split())
        for option, value in expected:
            after = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
            assert f"[default: {value}]" in after, (command, option, after)


def test_every_command_has_a_one_line_summary_and_is_documented():
    """`pipeline --help` lists each command on one line, and docs/commands.md shows each one."""
    from pathlib import Path

    from pipeline.cli import COMMANDS

    assert all(len(short) <= 55 for _, _, short in COMMANDS.values())
    readme = (Path(__file__).resolve().parents[1] / "docs/commands.md").read_text()
    missing = [name for name in COMMANDS if f"pipeline {name}" not in readme]
    assert not missing, f"commands docs/commands.md never shows: {missing}"
