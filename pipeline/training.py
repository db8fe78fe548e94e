"""The one training loop, shared by teachers (labels only) and students (labels + targets)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.progress import progress


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainData:
    """Rows to train on, already joined: inputs (N, ...), labels (N,), targets (N, C) or None."""

    inputs: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


LossOnBatch = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def fit(
    model: nn.Module,
    data: TrainData,
    loss_fn: LossOnBatch,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
    desc: str = "train",
) -> list[dict[str, float]]:
    """AdamW with a cosine schedule; returns one log row per epoch (loss, labelled accuracy)."""
    if epochs < 1 or batch_size < 1:
        raise PipelineError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    model.to(device)
    inputs, labels = data.inputs.to(device), data.labels.to(device)
    targets = None if data.targets is None else data.targets.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(data) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    log = []
    bar = progress(range(epochs), desc=desc, unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(data), generator=gen).to(device)
        total, correct, seen, labelled = 0.0, 0, 0, 0
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            out = model(inputs[idx])
            y = labels[idx]
            loss = loss_fn(out, None if targets is None else targets[idx], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            known = y >= 0
            labelled += int(known.sum())
            correct += int((out.argmax(1)[known] == y[known]).sum())
        row = {
            "epoch": epoch + 1,
            "loss": total / seen,
            "train_accuracy": correct / labelled if labelled else float("nan"),
        }
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['train_accuracy']:.3f}")
    model.eval()
    return log


@torch.no_grad()
def predict(
    model: nn.Module, inputs: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """Logits of `model` on `inputs` in eval mode.  # (N, C) float32"""
    model.eval().to(device)
    out = [
        model(torch.from_numpy(inputs[s : s + batch_size]).to(device)).float().cpu()
        for s in range(0, len(inputs), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
