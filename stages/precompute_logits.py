"""Stage: run the teacher (or an ensemble) once over a transfer set and cache raw logits."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import CacheWriter
from pipeline.config import PrecomputeConfig, as_dict
from pipeline.data import Fingerprint, TransferSet, load_transfer_set
from pipeline.errors import PipelineError
from pipeline.fsutil import check_writable
from pipeline.progress import progress
from pipeline.teachers import Teacher, load_teachers
from pipeline.training import resolve_device

COMBINES = ("mean-logits",)


def run(
    cfg: PrecomputeConfig,
    teachers: list[str],
    data: str,
    out: Path,
    overwrite: bool = False,
) -> Path:
    """Cache the mean of the teachers' raw logits over `data` at `out` (Zarr or HDF5)."""
    out = Path(out)
    check_writable(out, overwrite)
    if cfg.combine not in COMBINES:
        raise PipelineError(f"combine {cfg.combine!r}: expected one of {', '.join(COMBINES)}")
    if cfg.batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {cfg.batch_size}")
    device = resolve_device(cfg.device)
    ts = load_transfer_set(data)
    if len(ts) == 0:
        raise PipelineError(f"--data {data}: no samples")
    members = [t.to(device) for t in load_teachers(teachers, next(ts.batches(cfg.batch_size))[1])]

    writer = CacheWriter(
        out,
        sample_ids=ts.sample_ids,
        labels=ts.labels,
        num_classes=members[0].num_classes,
        dtype=cfg.dtype,
        compression=cfg.compression,
        chunk_rows=cfg.chunk_rows,
        chunks_per_shard=cfg.chunks_per_shard,
        fmt=cfg.format,
        overwrite=overwrite,
    )
    fp = Fingerprint(ts.input_shape, str(ts.inputs.dtype))
    with writer, torch.inference_mode():
        bar = progress(total=len(ts), desc="precompute-logits", unit="sample")
        for ids, x, _ in ts.batches(cfg.batch_size):
            fp.update(ids, x)
            xb = torch.from_numpy(np.ascontiguousarray(x)).to(device)
            logits = torch.stack([t(xb).float() for t in members]).mean(0)  # (B, C)
            writer.add(logits[:, None].cpu().numpy())  # (B, V=1, C)
            bar.update(len(ids))
        bar.close()
        return writer.finish(_provenance(cfg, members, ts, data, fp.hexdigest()))


def _provenance(
    cfg: PrecomputeConfig, members: list[Teacher], ts: TransferSet, data: str, fingerprint: str
) -> dict[str, Any]:
    import h5py
    import zarr

    import pipeline

    return {
        "class_names": members[0].class_names,
        "teacher": {"members": [t.provenance() for t in members], "combine": cfg.combine},
        "data": {
            "spec": data,
            "source": data.partition(":")[0],
            "split": data.partition(":")[2],
            "fingerprint": fingerprint,
            "input_shape": list(ts.input_shape),
        },
        "params": as_dict(cfg),
        "created_with": {
            "package": f"kd-pipeline {pipeline.__version__}",
            "torch": torch.__version__,
            "zarr": zarr.__version__,
            "h5py": h5py.__version__,
        },
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
