"""The CLI's surface: every stage listed, `python -m pipeline` works, no heavy imports on --help."""

import subprocess
import sys

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
    from pipeline.cli import cli

    for name, command in cli.commands.items():
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_pipeline():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True, check=True
    )
    assert "kd-pipeline" in out.stdout
