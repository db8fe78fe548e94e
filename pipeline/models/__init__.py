"""Model registry in the style of timm: `register_model`, `create_model`, `list_models`.

A factory takes ``num_classes`` and ``input_shape`` (per sample, e.g. (1, 8, 8)) plus its own
keyword arguments, and returns an `nn.Module` mapping (B, *input_shape) to (B, num_classes).
A `package.module:function` name is a user's factory, built the same way: it is given
``num_classes`` and ``input_shape`` when it accepts them, and the model kwargs.
`checkpoint` saves and loads a model with the registry name that rebuilds it.

Shared ground. May import: pipeline.core.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.usercode import call, is_reference, load_function

_MODELS: dict[str, Callable[..., Any]] = {}
_TOKEN_MODELS: set[str] = set()  # the language models among them


def register_model(fn: Callable[..., Any] | None = None, *, tokens: bool = False) -> Any:
    """Decorator: register a model factory under its function name (a second registration
    of a name replaces the first, with a warning, as timm does). `@register_model(tokens=True)`
    marks a language model: token ids (B, L) in, next-token logits (B, L, V) out."""
    if fn is None:
        return functools.partial(register_model, tokens=tokens)
    if fn.__name__ in _MODELS:
        warnings.warn(
            f"model {fn.__name__!r} is registered again: the new one replaces it", stacklevel=2
        )
    _MODELS[fn.__name__] = fn
    (_TOKEN_MODELS.add if tokens else _TOKEN_MODELS.discard)(fn.__name__)
    return fn


def is_language_model(name: str) -> bool:
    """Whether registry model `name` takes token ids (`@register_model(tokens=True)`)."""
    _import_builtin_models()
    return name in _TOKEN_MODELS


def list_models() -> list[str]:
    """Registered model names, sorted (`pipeline models` lists them with their sizes)."""
    _import_builtin_models()
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    what: str = "--model",
    **kwargs: Any,
) -> Any:  # -> nn.Module; torch is imported lazily
    """Instantiate registered model `name`, or the user factory `package.module:function`;
    unknown names, bad kwargs and factories that return no module are errors naming `what`
    (the option or params key the name came from). Only for names the user gave: a name read
    from a file goes to `create_registered_model` (pipeline.models.checkpoint)."""
    if is_reference(name):
        return _create_user_model(name, num_classes, tuple(input_shape), what, kwargs)
    return create_registered_model(name, num_classes, input_shape, kwargs, what)


def create_registered_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    kwargs: dict[str, Any],
    what: str = "--model",
) -> Any:  # -> nn.Module
    """Instantiate the registry's model `name` with `kwargs`; never imports anything else,
    whatever `name` is (a `package.module:function` is an unknown model here)."""
    _import_builtin_models()
    if name not in _MODELS:
        raise PipelineError(f"unknown model '{name}' (valid: {', '.join(sorted(_MODELS))})")
    try:
        return _MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:  # bad kwargs, negative sizes...
        raise PipelineError(
            f"{what} {name} with {kwargs or 'no arguments'}: {one_line(e, False)}"
        ) from None


def _create_user_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], what: str, kwargs: dict[str, Any]
) -> Any:
    import torch

    option = what
    fn, _ = load_function(name, option)
    try:
        accepts = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        accepts = {}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in accepts.values())
    given = {"num_classes": num_classes, "input_shape": input_shape}
    shape_args = {k: v for k, v in given.items() if takes_any or k in accepts}
    model = call(fn, option, name, **shape_args, **kwargs)
    if not isinstance(model, torch.nn.Module):
        raise PipelineError(
            f"{option} {name}: returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def model_origin(name: str) -> dict[str, str] | None:
    """Provenance of a user factory (reference and sha256 of its module); None for the
    registry's models, which the package version identifies."""
    return load_function(name, "--student")[1] if is_reference(name) else None


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _import_builtin_models() -> None:
    from pipeline.models import causal, cifar, hf, small  # noqa: F401


def describe_models(
    num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)
) -> list[dict[str, Any]]:
    """Name, parameter count and summary of every registered model at the given shape, and
    whether it is a language model (`tokens`).

    Models are built on torch's meta device: nothing is allocated, so this is fast even for
    wrn_28_10. A model that cannot take the shape gets params None and the reason.
    """
    import torch

    rows = []
    # Natural order: resnet8, resnet14, ..., resnet110.
    for name in sorted(
        list_models(), key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]
    ):
        doc = (_MODELS[name].__doc__ or "").strip().splitlines()
        row: dict[str, Any] = {"name": name, "params": None, "summary": doc[0] if doc else "",
                               "tokens": name in _TOKEN_MODELS}  # fmt: skip
        try:
            with torch.device("meta"):
                row["params"] = count_parameters(create_model(name, num_classes, input_shape))
        except (PipelineError, ValueError, RuntimeError) as e:
            row["error"] = str(e).splitlines()[0]
        rows.append(row)
    return rows
