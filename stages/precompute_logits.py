"""Stage: run the teacher (or an ensemble) once over a transfer set and cache raw logits
(`pipeline.teacher.precompute` does the work)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.cache.store import location
from pipeline.core.config import PrecomputeConfig
from pipeline.core.fsutil import check_not_input, data_path
from pipeline.teacher.precompute import precompute
from pipeline.teacher.teachers import FACTORY


def run(
    cfg: PrecomputeConfig,
    teachers: list[str],
    data: str,
    out: Path | str,
    overwrite: bool = False,
    max_cache_size: int | str | None = None,
) -> Path:
    """Cache the teachers' combined raw logits over `data` at `out` (Zarr or HDF5; a URL such
    as s3://bucket/t.zarr: Zarr on object storage).

    With `cfg.keep_members`, each member's logits are stored too (members/logits); with
    `cfg.augment`, the teachers see `cfg.views` augmented views of every sample and each view's
    seed is stored (views/seed); with `cfg.features`, the teacher's feature targets per view
    (features/NAME); with `cfg.topk` K (or `cfg.sample_k`), sparse targets in place of the
    full logits (topk/..., sample/...). The projected size of every node is printed first,
    and a cache larger than `max_cache_size` (None: half the free disk space) is refused.
    Re-running the same command after a crash resumes from the finished shards.
    """
    out = location(out)
    inputs = [("--teacher", teacher_file(t)) for t in teachers] + [("--data", data_path(data))]
    if isinstance(out, Path):  # a URL (object storage) cannot be a local input
        check_not_input(out, inputs)
    sources = cfg._sources  # errors name --views, params.yaml:...augment, not the bare key
    cfg = dataclasses.replace(cfg, teachers=list(teachers))  # recorded with the cache
    cfg._sources = sources
    return precompute(cfg, data, out, overwrite, max_cache_size)


def teacher_file(source: str) -> Path | None:
    """The file a `--teacher` reads: the checkpoint, TorchScript or ONNX file, or a factory's
    `@weights` file; None for a factory without weights."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    match = FACTORY.match(source)
    return Path(match["weights"]).expanduser() if match and match["weights"] else None
