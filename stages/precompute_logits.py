"""Stage: run the teacher (or an ensemble) once over a transfer set and cache raw logits
(`pipeline.precompute` does the work)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import PrecomputeConfig
from pipeline.precompute import precompute


def run(
    cfg: PrecomputeConfig,
    teachers: list[str],
    data: str,
    out: Path,
    overwrite: bool = False,
) -> Path:
    """Cache the teachers' combined raw logits over `data` at `out` (Zarr or HDF5).

    With `cfg.keep_members`, each member's logits are stored too (members/logits). Re-running
    the same command after a crash resumes from the finished shards.
    """
    cfg = dataclasses.replace(cfg, teachers=list(teachers))  # recorded with the cache
    return precompute(cfg, data, Path(out), overwrite)
