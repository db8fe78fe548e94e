"""Bringing your own code: `package.module:function` references to teachers, students and
losses, imported from the working directory or `sys.path`, with the file that defines them
hashed for provenance.

Only references the user writes (an option, params.yaml) come here; a reference read from a
file (a checkpoint's model) never does unless the user named the same one
(`pipeline.models.checkpoint`), so no artifact can make the tool import code."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError, one_line
from pipeline.core.fsutil import sha256_file

# `pkg.mod:function`; the module part may be dotted, the function part may not.
_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def is_reference(text: str) -> bool:
    """True for a `package.module:function` reference (not a registry name or a path)."""
    return bool(_REFERENCE.fullmatch(text))


def import_module(module: str, option: str, source: str) -> Any:
    """Import `module` with the working directory on the path (a console script's sys.path
    starts with the script's folder, not the working directory)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()
        return importlib.import_module(module)
    except BaseException as e:  # SystemExit too: user code that exits is a failed import
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PipelineError(
            f"{option} {source}: cannot import '{module}' ({one_line(e)})"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)


def load_function(reference: str, option: str) -> tuple[Callable[..., Any], dict[str, str]]:
    """The function `reference` names, and its provenance: the reference and the sha256 of
    the module's source file (what determines its behaviour)."""
    if not is_reference(reference):
        raise PipelineError(f"{option} {reference!r}: expected package.module:function")
    module, _, name = reference.partition(":")
    code = import_module(module, option, reference)
    fn = getattr(code, name, None)
    if not callable(fn):
        raise PipelineError(f"{option} {reference}: module '{module}' has no function '{name}'")
    return fn, {"source": reference, "sha256": module_sha256(code)}


def module_sha256(code: Any) -> str:
    """sha256 of a module's source file ('' for a module without one)."""
    file = getattr(code, "__file__", None)
    return sha256_file(file) if file and Path(file).is_file() else ""


def call(fn: Callable[..., Any], option: str, reference: str, *args: Any, **kwargs: Any) -> Any:
    """Call user code; any failure, `sys.exit` included, is one line naming the option."""
    try:
        return fn(*args, **kwargs)
    except PipelineError:
        raise
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        call_text = reference.replace(":", ".")
        raise PipelineError(f"{option} {reference}: {call_text}() failed ({one_line(e)})") from None
