"""Stage: check a cache end to end, optionally that it was built from given data, and with
teachers a spot check of stored rows against them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.cache.verify import check_cache
from pipeline.core.errors import PipelineError
from pipeline.data import load_transfer_set
from pipeline.teacher.spotcheck import DEFAULT_SEED, spot_check


def run(
    cache: Path,
    data: str | None = None,
    teachers: list[str] = (),
    sample: int = 64,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Verify the cache at `cache`; with `data`, also its fingerprint; with `teachers` (needs
    `data`), recompute `sample` random rows (drawn with `seed`) and compare. Returns a summary
    (`notes`: what could not be checked, e.g. a version-1 cache has no checksums).

    Raises PipelineError listing every problem on one line.
    """
    if teachers and data is None:
        raise PipelineError("--teacher needs --data: the inputs to recompute sampled rows from")
    if teachers and sample < 1:
        raise PipelineError(f"--sample must be >= 1, got {sample}")
    problems, summary = check_cache(cache)
    if data is not None and summary.get("fingerprint_scheme") == "sequences":  # a token cache
        problems += _sequence_data(cache, data, summary, teachers)
    elif data is not None:
        ts = load_transfer_set(data, lazy=True)
        fingerprint = ts.fingerprint(summary["fingerprint_scheme"])  # batch by batch
        if fingerprint != summary.get("fingerprint"):
            problems.append(
                f"built from other data than --data {data} (fingerprint "
                f"{str(summary.get('fingerprint'))[:12]}, the data's {fingerprint[:12]})"
            )
        summary["data"] = data
        if teachers:
            more, checked = spot_check(cache, ts, list(teachers), sample, seed)
            problems += more
            summary.update(checked)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise PipelineError(f"{cache}: {count}: {'; '.join(problems)}")
    return summary


def _sequence_data(cache: Path, data: str, summary: dict[str, Any], teachers: list[str]) -> list:
    """A token cache's check against `data`: sequences of the same fingerprint. A live
    teacher's spot check covers sample caches only."""
    from pipeline.data.sequences import is_sequence_spec, load_sequences

    if teachers:
        raise PipelineError(
            f"--teacher: {cache} is a token cache; the spot check against a live teacher is for "
            "sample caches only (verify checks a token cache's checksums, NaN/Inf and --data)"
        )
    if not is_sequence_spec(data):
        return [f"a token cache, and --data {data} is samples: give the sequences it was made from"]
    summary["data"] = data
    fingerprint = load_sequences(data).fingerprint()
    if fingerprint != summary.get("fingerprint"):
        return [
            f"built from other sequences than --data {data} (fingerprint "
            f"{str(summary.get('fingerprint'))[:12]}, the data's {fingerprint[:12]})"
        ]
    return []
