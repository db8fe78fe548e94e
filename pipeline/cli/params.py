"""`check-params`: every section of a params file, as every stage will read it."""

from __future__ import annotations

import click

from pipeline.cli.common import friendly_errors


@click.command("check-params")
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
