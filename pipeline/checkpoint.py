"""Model checkpoints: weights plus everything needed to rebuild the model and trace its origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError, one_line
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
    """Rebuild the model saved at `path`, in eval mode, on CPU; returns (model, meta).

    Every way a checkpoint can be malformed (unreadable, foreign, missing or mistyped keys,
    weights that do not fit the rebuilt model, a model name that no longer exists) is a
    one-line error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    payload = _read(path)
    state = payload.pop("state_dict")
    model = _rebuild(path, payload)
    _load_weights(path, model, payload["model"], state)
    model.eval()
    return model, payload


REQUIRED = ("model", "num_classes", "input_shape", "state_dict")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_plain(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v)
    )


_CHECKS = {  # key → (is it well formed, what is expected)
    "model": (lambda v: isinstance(v, str) and v != "", "a model name"),
    "num_classes": (_positive_int, "a positive integer"),
    "input_shape": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_positive_int, v)),
        "a list of positive integers",
    ),
    "model_kwargs": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        "a dict of keyword arguments",
    ),
    "state_dict": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
        ),
        "a dict of named tensors",
    ),
}


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint's payload, its keys and their types checked."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise PipelineError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path}: not a kd-pipeline checkpoint")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        keys = ", ".join(map(repr, missing))
        raise PipelineError(f"{path}: malformed checkpoint: no key {keys}")
    for key, (ok, expected) in _CHECKS.items():
        if key in payload and not ok(payload[key]):
            got = repr(payload[key]) if _is_plain(payload[key]) else type(payload[key]).__name__
            raise PipelineError(
                f"{path}: malformed checkpoint: {key} is {got[:60]}, expected {expected}"
            )
    return payload


def _rebuild(path: Path, payload: dict[str, Any]) -> nn.Module:
    """The model the checkpoint names, rebuilt from its name, kwargs, classes and shape."""
    name = payload["model"]
    try:
        return create_model(
            name,
            num_classes=payload["num_classes"],
            input_shape=tuple(payload["input_shape"]),
            **payload.get("model_kwargs", {}),
        )
    except PipelineError as e:
        raise PipelineError(f"{path}: cannot rebuild its model: {e}") from None
    except Exception as e:  # a model's own constructor rejecting its saved kwargs or shape
        raise PipelineError(f"{path}: cannot rebuild model {name!r}: {one_line(e)}") from None


def _load_weights(path: Path, model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load `state` strictly; a mismatch names the first few keys it concerns."""
    own = model.state_dict()
    problems = [
        _few("missing", [k for k in own if k not in state]),
        _few("unexpected", [k for k in state if k not in own]),
        _few(
            "wrong shape",
            [
                f"{k} {tuple(state[k].shape)} (model: {tuple(t.shape)})"
                for k, t in own.items()
                if k in state and state[k].shape != t.shape
            ],
        ),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise PipelineError(f"{path}: its weights do not fit model {name!r}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state)
    except Exception as e:  # e.g. a tensor torch cannot copy into the parameter
        raise PipelineError(f"{path}: its weights do not load: {one_line(e)}") from None


def _few(what: str, keys: list[str], shown: int = 3) -> str:
    """'missing: a, b, c (+2 more)', or '' when `keys` is empty."""
    if not keys:
        return ""
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{what}: {', '.join(keys[:shown])}{more}"
