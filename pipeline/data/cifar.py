"""CIFAR-10 / CIFAR-100 from the python pickle batches exactly as distributed (no download).

cifar-10-batches-py: data_batch_1..5 (train), test_batch, batches.meta (label_names).
cifar-100-python: train, test, meta (fine_label_names, coarse_label_names).
Each batch is a dict with b"data" (N, 3072) uint8, the red, green and blue 32x32 planes of
each image one after the other, and b"labels" (CIFAR-10) or b"fine_labels"/b"coarse_labels".
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data import NORMALIZE_OPTIONS, Options, TransferSet, register_source
from pipeline.data.arrays import lazy_set


@register_source("cifar10", options=("split", *NORMALIZE_OPTIONS))
def cifar10(arg: str, opts: Options) -> TransferSet:
    """CIFAR-10 python batches as distributed (the cifar-10-batches-py folder).

    inputs (N, 3, 32, 32) float32: pixels / 255, then (x - mean) / std per channel; ids are
    row numbers within the split (train: data_batch_1..5 in order).
    """
    root = _folder(arg, "cifar-10-batches-py", opts.spec)
    split = opts.choice("split", ("train", "test"))
    if split == "train":
        files = sorted(root.glob("data_batch_*"), key=lambda p: _number(p.name))
    else:
        files = [root / "test_batch"] if (root / "test_batch").is_file() else []
    if not files:
        wanted = "data_batch_1..5" if split == "train" else "test_batch"
        raise PipelineError(
            f"--data {opts.spec}: no {wanted} in {root} (expected the cifar-10-batches-py "
            "folder as distributed)"
        )
    meta = _read_optional(root / "batches.meta", opts.spec)
    return _cifar_set(opts, files, b"labels", meta.get(b"label_names"))


@register_source("cifar100", options=("split", "labels", *NORMALIZE_OPTIONS))
def cifar100(arg: str, opts: Options) -> TransferSet:
    """CIFAR-100 python files as distributed (the cifar-100-python folder).

    inputs (N, 3, 32, 32) float32 as for cifar10; `labels=fine` (100 classes, the default)
    or `labels=coarse` (20 superclasses).
    """
    root = _folder(arg, "cifar-100-python", opts.spec)
    split = opts.choice("split", ("train", "test"))
    kind = opts.choice("labels", ("fine", "coarse"))
    if not (root / split).is_file():
        raise PipelineError(
            f"--data {opts.spec}: no '{split}' file in {root} (expected the cifar-100-python "
            "folder as distributed)"
        )
    meta = _read_optional(root / "meta", opts.spec)
    names = meta.get(f"{kind}_label_names".encode())
    return _cifar_set(opts, [root / split], f"{kind}_labels".encode(), names)


def _cifar_set(
    opts: Options, files: list[Path], label_key: bytes, names: list[bytes] | None
) -> TransferSet:
    data, labels = [], []
    for path in files:
        batch = read_batch(path, opts.spec)
        x, y = batch.get(b"data"), batch.get(label_key)
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 3072 or y is None:
            raise PipelineError(
                f"--data {opts.spec}: {path} is not a CIFAR batch (expected b'data' "
                f"(N, 3072) uint8 and b'{label_key.decode()}')"
            )
        if len(y) != len(x):
            raise PipelineError(f"--data {opts.spec}: {path} has {len(x)} images, {len(y)} labels")
        data.append(x.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(y, np.int64))
    pixels = np.concatenate(data)  # (N, 3, 32, 32) uint8: 4x smaller than float32
    names = None if names is None else [_text(n) for n in names]
    return lazy_set(opts, pixels, np.concatenate(labels), None, divide=255.0, class_names=names)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: dicts, lists, bytes and numpy arrays, nothing executable.

    A pickle can run any code on load; these files come from the internet.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 renamed it; avoid the shim's warning
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def read_batch(path: Path, spec: str) -> dict[bytes, Any]:
    """One CIFAR pickle file (Python 2 pickles: bytes keys)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise PipelineError(
            f"--data {spec}: {path} is not a CIFAR batch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(batch, dict):
        raise PipelineError(f"--data {spec}: {path} is not a CIFAR batch file (not a dict)")
    return batch


def _read_optional(path: Path, spec: str) -> dict[bytes, Any]:
    return read_batch(path, spec) if path.is_file() else {}


def _folder(arg: str, distributed_name: str, spec: str) -> Path:
    """DIR itself, or DIR/cifar-10-batches-py when given the folder the archive unpacked into."""
    root = Path(arg).expanduser()
    if (root / distributed_name).is_dir():
        root = root / distributed_name
    if not root.is_dir():
        raise PipelineError(f"--data {spec}: {root} is not a directory")
    return root


def _number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 0


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
