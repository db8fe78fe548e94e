"""Stage: train a student against cached teacher logits. The teacher is never loaded."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import open_cache
from pipeline.checkpoint import save_checkpoint
from pipeline.config import TrainStudentConfig, as_dict
from pipeline.data import TransferSet, load_transfer_set, mask_labels
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output, check_writable
from pipeline.losses import TEACHER_FREE, get_loss
from pipeline.models import count_parameters, create_model
from pipeline.training import TrainData, fit, resolve_device, seed_everything

CHECKPOINT = "student.pt"
LOG = "train_log.csv"
INFO = "student.json"


def validate(cfg: TrainStudentConfig) -> None:
    """Reject impossible hyperparameters before any data is read."""
    get_loss(cfg.loss)
    if cfg.temperature <= 0:
        raise PipelineError(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise PipelineError(f"--alpha must be in [0, 1], got {cfg.alpha}")
    if not 0.0 <= cfg.labeled_fraction <= 1.0:
        raise PipelineError(f"labeled_fraction must be in [0, 1], got {cfg.labeled_fraction}")


def load_targets(
    cache_path: Path, ts: TransferSet, cross_modal: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """Teacher logits for each row of `ts`, joined on sample ids.  # (N, C), cache attrs

    Refuses an incomplete cache and one built from other data. `cross_modal` (the teacher saw
    another modality of the same samples) skips the fingerprint check: every id of `ts` must
    still be in the cache.
    """
    with open_cache(cache_path) as cache:
        cache.require_complete()
        if not cross_modal:
            cache.require_fingerprint(ts.fingerprint(), ts.spec)
        rows = cache.rows_for(ts.sample_ids)
        logits = cache.logits()[rows, 0]  # view 0 → (N, C)
        return logits, cache.attrs


def run(
    cfg: TrainStudentConfig,
    cache: Path,
    data: str,
    out: Path,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Distil `cfg.model` from the cache at `cache` on `data`; write a student dir at `out`."""
    out = Path(out)
    validate(cfg)
    check_writable(out, overwrite)
    device = resolve_device(cfg.device)
    ts = load_transfer_set(data)
    labels = mask_labels(ts.labels, cfg.labeled_fraction, cfg.seed)
    targets, attrs = load_targets(Path(cache), ts, cfg.cross_modal)
    num_classes = int(attrs["num_classes"])
    uses_teacher = cfg.loss not in TEACHER_FREE
    if cfg.loss == "kd" and cfg.alpha < 1.0 and not (labels >= 0).any():
        raise PipelineError(
            f"--data {data} has no labels: use --alpha 1 (pure soft targets) with loss kd"
        )
    keep = np.ones(len(ts), bool) if uses_teacher else labels >= 0
    if not keep.any():
        raise PipelineError(f"loss {cfg.loss!r} needs labels, and --data {data} has none")

    seed_everything(cfg.seed)
    model = create_model(cfg.model, num_classes, ts.input_shape, **cfg.model_kwargs)
    loss = get_loss(cfg.loss)
    rows = TrainData(
        torch.from_numpy(ts.inputs[keep]),
        torch.from_numpy(labels[keep]),
        torch.from_numpy(targets[keep]) if uses_teacher else None,
    )
    log = fit(
        model,
        rows,
        lambda s, t, y: loss(s, t, y, temperature=cfg.temperature, alpha=cfg.alpha),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        device=device,
        desc=f"train-student {name or cfg.model}",
    )
    info = {
        "role": "student",
        "name": name or out.name,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "num_classes": num_classes,
        "class_names": attrs.get("class_names"),
        "input_shape": list(ts.input_shape),
        "num_params": count_parameters(model),
        "config": as_dict(cfg),
        "data": {"spec": data, "num_labelled": int((labels >= 0).sum()), "num_rows": len(ts)},
        "cache": {"path": str(cache), "teacher": attrs.get("teacher"), "data": attrs.get("data")},
    }
    with atomic_output(out, overwrite) as tmp:
        tmp.mkdir(parents=True)
        save_checkpoint(tmp / CHECKPOINT, model.cpu(), info)
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        with open(tmp / LOG, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(log[0]))
            writer.writeheader()
            writer.writerows(log)
    return out
