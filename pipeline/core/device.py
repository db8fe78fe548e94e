"""Where a run computes (CPU or CUDA) and how it is seeded: shared by every stage."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pipeline.core.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # meta holds no data to train
        raise PipelineError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise PipelineError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders epoch `epoch`: a function of (seed, epoch) alone, so a run
    resumed at any epoch sees the same order as an uninterrupted one."""
    return np.random.default_rng([seed, epoch])


# Forward FLOPs per sample under which a model runs on one CPU thread when --threads is not
# given. benchmarks/bench_threads.py (2-core machine, batch 64): an MLP of 38 kFLOPs steps
# equally fast on 1 and 2 threads when the machine is idle and about 5x slower on 2 under
# load, a 160 kFLOPs CNN 1.2x faster on 2, models from 2.5 MFLOPs 1.4-1.7x faster on 2.
ONE_THREAD_BELOW_FLOPS = 1_000_000
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before anything changes it
# The user chose the thread count for this process (torch's default then honours it as is).
THREADS_FROM_ENV = "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ


def forward_flops(model: torch.nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass on one sample (B = 1); 2 x parameters when the counter
    cannot follow the model (its matmuls dominate either way)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(sample[:1])
        return int(counter.get_total_flops())
    except Exception:
        return 2 * sum(p.numel() for p in model.parameters())
    finally:
        model.train(was_training)


def choose_threads(flops: int, requested: int = 0) -> int:
    """CPU threads to compute with: `requested` when given (> 0); else 1 for a small model
    (per-op overhead dominates and threads only contend), and for a larger one every core but
    one (OMP_NUM_THREADS, when set, as it says).

    Why leave a core: OpenMP threads meet at a barrier after every op, so one thread that
    shares its core with another process stalls them all. On a 2-core machine beside one busy
    process, train-teacher on the default took 16.1 s on 2 threads and 10.3 s on 1 (6.7 and
    10.6 s idle; benchmarks/bench_load.py). The choice depends only on the model and the
    machine, never on its load: the thread count can change the last bits of training, and
    the same inputs must give the same bytes."""
    if requested:
        return requested
    if flops < ONE_THREAD_BELOW_FLOPS:
        return 1
    return DEFAULT_THREADS if THREADS_FROM_ENV else max(1, DEFAULT_THREADS - 1)


def use_threads(model: torch.nn.Module, sample: torch.Tensor, requested: int = 0) -> int:
    """Set torch's CPU threads for computing with `model` (the `choose_threads` rule on its
    forward FLOPs, from `sample` (B, ...)); returns the count."""
    threads = choose_threads(0 if requested else forward_flops(model, sample), requested)
    torch.set_num_threads(threads)
    return threads
