"""Stage: plot one or more samples' teacher distributions at several temperatures."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.store import location
from pipeline.core.fsutil import atomic_output, check_not_input, check_writable
from pipeline.report.figures import image_format, plot_targets, read_targets


def run(
    cache: Path,
    ids: list[int] | None,
    temperatures: tuple[float, ...],
    out: Path,
    count: int = 4,
    overwrite: bool = False,
) -> list[int]:
    """Write the figure to `out` (PNG, PDF, SVG or JPEG, by its extension) for sample `ids` of
    `cache` (default: the `count` samples the teacher finds most ambiguous); returns the ids
    shown."""
    fmt = image_format(Path(out))  # refused before anything is read
    check_not_input(Path(out), {"CACHE": location(cache)})
    check_writable(Path(out), overwrite)
    targets = read_targets(location(cache), ids, count)
    with atomic_output(out, overwrite) as tmp:
        plot_targets(targets, temperatures, tmp, fmt)
    return targets["ids"]
