"""Tiny fixtures of every transfer-set and teacher format, written into a test's tmp_path."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv → global average pool → linear: accepts any (C, H, W) with `channels` channels."""

    def __init__(self, channels: int, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_net(channels: int, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet(channels, classes).eval()


def save_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still used
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def export_onnx(model: nn.Module, path: Path, sample_shape: tuple[int, ...]) -> Path:
    """ONNX export with a dynamic batch axis (the legacy exporter: fast, needs only `onnx`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, *sample_shape),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def write_factory(folder: Path, module: str, channels: int, classes: int = 3) -> Path:
    """A Python module `module.py` in `folder` with `build()` returning an untrained TinyNet."""
    path = folder / f"{module}.py"
    path.write_text(
        "import torch\n"
        "from torch import nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        self.conv = nn.Conv2d({channels}, 4, 3, padding=1)\n"
        f"        self.head = nn.Linear(4, {classes})\n\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.conv(x)).mean((2, 3)))\n\n\n"
        "def build():\n"
        "    torch.manual_seed(123)\n"
        "    return Net()\n\n\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    return path


def pixels(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images (n, *shape)."""
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_images(root: Path, classes: dict[str, np.ndarray], suffix: str = ".png") -> list[Path]:
    """One lossless image file per (H, W, 3) or (H, W) uint8 array, in class folders.

    An empty class name writes the images straight into `root` (unlabelled).
    """
    from PIL import Image

    paths = []
    for name, images in classes.items():
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            path = folder / f"img{i:03d}{suffix}"
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths


def write_cifar10(root: Path, batches: int = 2, rows: int = 6, test_rows: int = 5, seed: int = 0):
    """cifar-10-batches-py as distributed, tiny: data_batch_1.., test_batch, batches.meta.

    Returns (train data (N, 3072) uint8, train labels, test data, test labels).
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_x, train_y = [], []
    for b in range(1, batches + 1):
        x = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, rows).tolist()
        _dump(root / f"data_batch_{b}", _batch(f"training batch {b} of {batches}", x, y))
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (test_rows, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 10, test_rows).tolist()
    _dump(root / "test_batch", _batch("testing batch 1 of 1", test_x, test_y))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(
        root / "batches.meta",
        {b"num_cases_per_batch": rows, b"label_names": names, b"num_vis": 3072},
    )
    return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def write_cifar100(root: Path, rows: int = 7, test_rows: int = 4, seed: int = 1):
    """cifar-100-python as distributed, tiny: train, test, meta (fine and coarse names).

    Returns {split: (data (N, 3072) uint8, fine labels, coarse labels)}.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", rows), ("test", test_rows)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        _dump(
            root / split,
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": fine,
                b"coarse_labels": coarse,
                b"data": x,
            },
        )
        out[split] = (x, np.array(fine), np.array(coarse))
    _dump(
        root / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return out


def _batch(label: str, x: np.ndarray, y: list[int]) -> dict:
    return {
        b"batch_label": label.encode(),
        b"labels": y,
        b"data": x,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the distributed files are protocol-2 pickles


def assert_one_line_error(result, *fragments: str) -> None:
    """A CLI failure: non-zero exit, one `Error:` line holding every fragment, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], result.output


def precompute(runner, teacher, data: str, out: Path):
    """`pipeline precompute-logits` on CPU (bit-exact against a CPU forward); click's Result."""
    from tests.conftest import invoke

    args = ["--teacher", teacher, "--data", data, "--out", out, "--device", "cpu"]
    return invoke(runner, "precompute-logits", *args)
