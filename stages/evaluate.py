"""Stage: score a student on the test split against the cached teacher (teacher not loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.checkpoint import load_checkpoint
from pipeline.config import EvaluateConfig, as_dict
from pipeline.data import load_transfer_set
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output
from pipeline.training import predict, resolve_device
from stages.train_student import CHECKPOINT, load_targets


def metrics(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (labelled rows), top-1 agreement and KL(teacher ‖ student) at T = 1.

    student, teacher: (N, C) logits; labels: (N,) with -1 where unknown.
    """
    s, t = torch.from_numpy(student).double(), torch.from_numpy(teacher).double()
    known = labels >= 0
    s_pred, t_pred = s.argmax(1).numpy(), t.argmax(1).numpy()
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
    return {
        "accuracy": float((s_pred[known] == labels[known]).mean()) if known.any() else None,
        "teacher_accuracy": float((t_pred[known] == labels[known]).mean()) if known.any() else None,
        "agreement": float((s_pred == t_pred).mean()),
        "kl_teacher_student": float(kl),
        "num_samples": int(len(labels)),
    }


def run(cfg: EvaluateConfig, student: Path, cache: Path, data: str, out: Path) -> dict[str, Any]:
    """Write `out` (metrics.json) for the student directory `student`."""
    ckpt = Path(student) / CHECKPOINT
    if not ckpt.is_file():
        raise PipelineError(f"--student {student}: no {CHECKPOINT} in it (train-student output?)")
    model, info = load_checkpoint(ckpt)
    ts = load_transfer_set(data)
    teacher, attrs = load_targets(Path(cache), ts, cfg.cross_modal)
    if int(attrs["num_classes"]) != info["num_classes"]:
        raise PipelineError(
            f"student has {info['num_classes']} classes but cache {cache} has "
            f"{attrs['num_classes']}"
        )
    logits = predict(model, ts.inputs, cfg.batch_size, resolve_device(cfg.device))
    members = (attrs.get("teacher") or {}).get("members", [])
    result = {
        "student": info["name"],
        "model": info["model"],
        "num_params": info["num_params"],
        "loss": info["config"]["loss"],
        "temperature": info["config"]["temperature"],
        "alpha": info["config"]["alpha"],
        "labeled_fraction": info["config"]["labeled_fraction"],
        **metrics(logits, teacher, ts.labels),
        "teacher": {
            "models": [m.get("name") for m in members],
            "num_params": sum(m.get("num_params") or 0 for m in members),
        },
        "data": data,
        "config": as_dict(cfg),
    }
    with atomic_output(out, overwrite=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result
