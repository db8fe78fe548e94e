"""Stage: train a teacher on a labelled split and save a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.config import TrainTeacherConfig, as_dict
from pipeline.data import load_transfer_set
from pipeline.errors import PipelineError
from pipeline.fsutil import check_writable
from pipeline.losses import labelled_ce
from pipeline.models import count_parameters, create_model
from pipeline.training import TrainData, fit, resolve_device, seed_everything


def run(cfg: TrainTeacherConfig, data: str, out: Path, overwrite: bool = False) -> Path:
    """Fit `cfg.model` on the labelled rows of `data`; write the checkpoint to `out`."""
    out = Path(out)
    check_writable(out, overwrite)
    device = resolve_device(cfg.device)
    ts = load_transfer_set(data)
    known = ts.labels >= 0
    if not known.any():
        raise PipelineError(f"--data {data}: a teacher needs labels, and this data has none")
    num_classes = len(ts.class_names) if ts.class_names else int(ts.labels.max()) + 1

    seed_everything(cfg.seed)
    model = create_model(cfg.model, num_classes, ts.input_shape, **cfg.model_kwargs)
    rows = TrainData(torch.from_numpy(ts.inputs[known]), torch.from_numpy(ts.labels[known]))
    log = fit(
        model,
        rows,
        lambda s, t, y: labelled_ce(s, y),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        device=device,
        desc="train-teacher",
    )
    meta = {
        "role": "teacher",
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "num_classes": num_classes,
        "class_names": ts.class_names,
        "input_shape": list(ts.input_shape),
        "num_params": count_parameters(model),
        "config": as_dict(cfg),
        "data": {"spec": data, "fingerprint": ts.fingerprint()},
        "log": log,
    }
    return save_checkpoint(out, model.cpu(), meta, overwrite=overwrite)
