"""Model checkpoints: weights plus everything needed to rebuild the model and trace its origin.

A checkpoint is data, never code: it is read with `weights_only=True`, and the model it names
is rebuilt from the registry with plain keyword arguments. A checkpoint whose model is a
`package.module:function` factory is rebuilt only when the caller passes that same reference
as `code`, one the user named on the command line or in params.yaml; otherwise it is refused
before anything is imported.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.fsutil import atomic_output
from pipeline.core.usercode import is_reference
from pipeline.models import create_model, create_registered_model

CHECKPOINT_FORMAT = "kd-pipeline-checkpoint"


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: dict[str, Any], overwrite: bool = False
) -> Path:
    """Save `model`'s weights with `meta` (model, model_kwargs, num_classes, input_shape, ...)."""
    payload = {"format": CHECKPOINT_FORMAT, **meta, "state_dict": model.state_dict()}
    with atomic_output(path, overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


class UntrustedCode(PipelineError):
    """A checkpoint names code as its model, and the caller did not name that code."""

    def __init__(self, message: str, path: Path, reference: str):
        super().__init__(message)
        self.path, self.reference = path, reference


def load_checkpoint(
    path: str | Path,
    code: str | None = None,
    trust_with: str = "--model",
    code_from: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at `path`, in eval mode, on CPU; returns (model, meta).

    `code` is the `package.module:function` the user named (`code_from` says where: an option
    or a params.yaml key; by default `trust_with`): a checkpoint whose model is that factory
    is rebuilt through it; one naming any other code is refused (`UntrustedCode`, saying what
    to type: `trust_with` and the reference), whatever `code` is.

    Every way a checkpoint can be malformed (unreadable, foreign, missing or mistyped keys,
    weights that do not fit the rebuilt model, a model name that no longer exists) is a
    one-line error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    return from_payload(path, read_payload(path), code, trust_with, code_from)


def read_payload(path: Path) -> Any:
    """What torch.load gives for `path`, with weights_only=True (no object is unpickled)."""
    try:
        with warnings.catch_warnings():  # a TorchScript archive: refused below, not run
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise PipelineError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def names_model(payload: Any, reference: str) -> bool:
    """Whether `payload` (from `read_payload`) is a kd-pipeline checkpoint of `reference`."""
    return (
        isinstance(payload, dict)
        and payload.get("format") == CHECKPOINT_FORMAT
        and payload.get("model") == reference
    )


def from_payload(
    path: Path,
    payload: Any,
    code: str | None = None,
    trust_with: str = "--model",
    code_from: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """`load_checkpoint` on a payload already read from `path`."""
    payload = _checked(path, payload)
    state = payload.pop("state_dict")
    if is_reference(payload["model"]) and payload["model"] != code:
        message = _untrusted(path, payload["model"], code, trust_with, code_from or trust_with)
        raise UntrustedCode(message, path, payload["model"])
    model = _rebuild(path, payload, code, trust_with)
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


def _is_data(v: Any, depth: int = 0) -> bool:
    """Plain data, as JSON holds it: what a model's keyword arguments may be (no tensors, no
    objects), nested at most 8 deep."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return True
    if depth >= 8:
        return False
    if isinstance(v, (list, tuple)):
        return all(_is_data(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_data(x, depth + 1) for k, x in v.items())
    return False


_CHECKS = {  # key → (is it well formed, what is expected)
    "model": (lambda v: isinstance(v, str) and v != "", "a model name"),
    "num_classes": (_positive_int, "a positive integer"),
    "input_shape": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_positive_int, v)),
        "a list of positive integers",
    ),
    "model_kwargs": (
        lambda v: isinstance(v, dict) and _is_data(v),
        "a dict of keyword arguments holding plain data",
    ),
    "state_dict": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
        ),
        "a dict of named tensors",
    ),
}


def _checked(path: Path, payload: Any) -> dict[str, Any]:
    """The checkpoint's payload, its keys and their types checked."""
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
    return dict(payload)


def _rebuild(path: Path, payload: dict[str, Any], code: str | None, trust_with: str) -> nn.Module:
    """The model the checkpoint names, rebuilt from its name, kwargs, classes and shape: from
    the registry, or through the user's factory when it is the `code` the user named."""
    name = payload["model"]
    classes_and_shape = (payload["num_classes"], tuple(payload["input_shape"]))
    kwargs = payload.get("model_kwargs", {})
    try:
        if is_reference(name) and name == code:  # the user's own factory, named by the user
            return create_model(name, *classes_and_shape, what=trust_with, **kwargs)
        # Every weight of a registry model is loaded next (strictly): initialising is waste.
        # (Not a user's factory: it may fill a buffer the state dict does not hold.)
        with skip_init():
            return create_registered_model(name, *classes_and_shape, kwargs)
    except PipelineError as e:
        raise PipelineError(f"{path}: cannot rebuild its model: {e}") from None
    except Exception as e:  # a model's own constructor rejecting its saved kwargs or shape
        raise PipelineError(f"{path}: cannot rebuild model {name!r}: {one_line(e)}") from None


_INIT_FUNCTIONS = (
    "normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
    "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_", "orthogonal_",
)  # fmt: skip


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build a model without initialising its weights (torch.nn.init's functions do nothing),
    for a model whose every weight is loaded right after: rebuilding a 110M-parameter
    transformer took 1.5 s of random numbers on a CPU, thrown away. As transformers'
    `no_init_weights`."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _untrusted(path: Path, name: str, code: str | None, trust_with: str, code_from: str) -> str:
    """The refusal of a checkpoint naming code `name`, and what the user types if they trust
    it."""
    if code is None:
        return (
            f"{path}: its model is the code {name!r}, and a checkpoint may not run code; "
            f"if you trust {name}, name it yourself: {trust_with} {name}"
        )
    return (
        f"{path}: its model is the code {name!r}, not {code!r} ({code_from}); a checkpoint "
        f"may not run code you did not name: if you trust {name}, give {trust_with} {name}"
    )


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
