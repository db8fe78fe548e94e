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
