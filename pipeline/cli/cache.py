"""Commands on a cache: inspect, verify, convert-cache."""

from __future__ import annotations

import json
from typing import Any

import click

from pipeline.cli.common import (
    friendly_errors,
    overwrite_option,
)


@click.command("inspect")
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


def _shards_read(summary: dict[str, Any]) -> str:
    """ "every node read, all 12 shard(s)": shards counted as inspect counts them."""
    return f"every node read, all {summary['num_shards']} shard(s)"


@click.command("verify")
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


@click.command("convert-cache")
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
