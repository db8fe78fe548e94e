"""Model checkpoints: weights plus everything needed to rebuild the model and trace its origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output
from pipeline.models import create_model

CHECKPOINT_FORMAT = "kd-pipeline-checkpoint"


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: dict[str, Any], overwrite: bool = False
) -> Path:
    """Save `model`'s weights with `meta` (model, model_kwargs, num_classes, input_shape, ...)."""
    payload = {"format": CHECKPOINT_FORMAT, **meta, "state_dict": model.state_dict()}
    with atomic_output(path, overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at `path`, in eval mode, on CPU; returns (model, meta)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise PipelineError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path}: not a kd-pipeline checkpoint")
    state = payload.pop("state_dict")
    model = create_model(
        payload["model"],
        num_classes=payload["num_classes"],
        input_shape=tuple(payload["input_shape"]),
        **payload.get("model_kwargs", {}),
    )
    model.load_state_dict(state)
    model.eval()
    return model, payload
