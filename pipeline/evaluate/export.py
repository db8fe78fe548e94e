"""Exporting a trained student to TorchScript or ONNX, checked against the PyTorch model.

The exported file is written beside its destination, loaded back, run on seeded random inputs
at two batch sizes (the batch axis stays dynamic) and compared with the PyTorch student; only a
file that reproduces it is moved into place. ONNX needs the optional extra:
``pip install "kd-pipeline[onnx]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_output
from pipeline.models import is_language_model

FORMATS = ("torchscript", "onnx")
METADATA_KEY = "kd-pipeline.json"  # TorchScript extra file / ONNX metadata key: the student info

Runner = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter: TorchScript's deprecation notice (torch 2.13 prefers
    torch.export; the format is still what many runtimes load) and ONNX's registry warnings."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise PipelineError(
            f'ONNX export needs {", ".join(missing)}: pip install "kd-pipeline[onnx]"'
        )


def save_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: str) -> Runner:
    """Trace `model` on `example` and save it; returns a runner of the saved file."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: meta})
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def save_onnx(model: nn.Module, example: torch.Tensor, path: Path, meta: str, opset: int) -> Runner:
    """Export `model` with a dynamic batch axis, attach `meta`; returns an onnxruntime runner."""
    _require_onnx()
    import onnx
    import onnxruntime as ort

    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,  # one self-contained file (students are far below 2 GB)
            verbose=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    proto = onnx.load(str(path))
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if written != opset:  # the exporter raises the opset when an op needs a newer one
        raise PipelineError(
            f"--opset {opset}: the exporter needed opset {written} for this model; "
            f"use --opset {written} (or a runtime that reads it)"
        )
    proto.metadata_props.add(key=METADATA_KEY, value=meta)
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# The extensions each format is written under; any other is refused, not written under a
# name that promises another format (a .tflite that holds TorchScript).
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".pth", ".torchscript")}


def format_for(out: Path, fmt: str = "auto") -> str:
    """The export format: from `out`'s extension when `fmt` is auto (.onnx → onnx, .pt, .ts,
    .pth → torchscript); an extension that names no format, or another one, is refused."""
    if fmt != "auto" and fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    suffix = Path(out).suffix.lower()
    by_suffix = next((f for f, names in SUFFIXES.items() if suffix in names), None)
    if by_suffix is None:
        known = ", ".join(f"{s} ({f})" for f, names in SUFFIXES.items() for s in names)
        raise PipelineError(f"--out {out}: expected one of the extensions {known}")
    if fmt not in ("auto", by_suffix):
        raise PipelineError(f"--out {out} is named as a {by_suffix} file but --format is {fmt}")
    return by_suffix


def export_model(
    model: nn.Module,
    info: dict[str, Any],
    out: Path,
    *,
    fmt: str,
    check_rows: int = 8,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    opset: int = 18,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `model` (input shape and metadata in `info`) to `out` as `fmt`; returns the check.

    The check runs the exported file and the PyTorch model on seeded random inputs at batch
    sizes 1 and `check_rows`; any difference beyond rtol/atol is an error and writes nothing.
    """
    fmt = format_for(out, fmt)
    if check_rows < 2:
        raise PipelineError(f"check_rows must be >= 2 (a dynamic batch axis), got {check_rows}")
    model = model.cpu().eval()
    shape = tuple(info["input_shape"])
    gen = torch.Generator().manual_seed(0)
    if is_language_model(str(info.get("model"))):  # token ids, not floats
        inputs = torch.randint(0, int(info["num_classes"]), (check_rows, *shape), generator=gen)
    else:
        inputs = torch.randn((check_rows, *shape), generator=gen)
    meta = json.dumps(info)
    with atomic_output(out, overwrite) as tmp:
        if fmt == "torchscript":
            run = save_torchscript(model, inputs, tmp, meta)
        else:
            run = save_onnx(model, inputs, tmp, meta, opset)
        worst = 0.0
        for batch in (inputs[:1], inputs):
            with torch.no_grad():
                want = model(batch).numpy()
            got = run(np.ascontiguousarray(batch.numpy()))
            if got.shape != want.shape:
                raise PipelineError(f"{fmt} output shape {got.shape}, PyTorch {want.shape}")
            worst = max(worst, float(np.abs(got - want).max()))
            if not np.allclose(got, want, rtol=rtol, atol=atol):
                raise PipelineError(
                    f"{fmt} export differs from the PyTorch student: max |diff| {worst:.3g} "
                    f"(rtol {rtol}, atol {atol}); nothing written"
                )
    return {
        "format": fmt,
        "path": str(out),
        "size_bytes": Path(out).stat().st_size,
        "checked_batches": [1, check_rows],
        "max_abs_diff": worst,
        "rtol": rtol,
        "atol": atol,
    }
