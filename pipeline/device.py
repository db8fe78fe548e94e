"""Where a run computes (CPU or CUDA) and how it is seeded: shared by every stage."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.errors import PipelineError


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


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders epoch `epoch`: a function of (seed, epoch) alone, so a run
    resumed at any epoch sees the same order as an uninterrupted one."""
    return np.random.default_rng([seed, epoch])
