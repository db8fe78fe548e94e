"""Stage: check a cache end to end, and optionally that it was built from given data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.cache.verify import check_cache
from pipeline.data import load_transfer_set
from pipeline.errors import PipelineError


def run(
    cache: Path, data: str | None = None, teachers: list[str] = (), sample: int = 64
) -> dict[str, Any]:
    """Verify the cache at `cache`; with `data`, also its fingerprint. Returns a summary.

    Raises PipelineError listing every problem on one line.
    """
    problems, summary = check_cache(cache)
    if data is not None:
        fingerprint = load_transfer_set(data, lazy=True).fingerprint()  # batch by batch
        if fingerprint != summary.get("fingerprint"):
            problems.append(
                f"built from other data than --data {data} (fingerprint "
                f"{str(summary.get('fingerprint'))[:12]}, the data's {fingerprint[:12]})"
            )
        summary["data"] = data
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise PipelineError(f"{cache}: {count}: {'; '.join(problems)}")
    return summary
