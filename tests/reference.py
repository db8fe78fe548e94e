"""Reference forward passes, batched exactly as the code under test batches them.

CPU kernels may round a batch of another shape differently (AVX-512/AMX, AVX2 and the scalar
code each cut their sums otherwise), so a reference that must equal a cache or a metric bit
for bit runs the model on the very batches the pipeline ran it on, never all rows at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.core import training
from pipeline.core.config import EvaluateConfig, PrecomputeConfig
from pipeline.teacher.shards import forward_batches

PRECOMPUTE_BATCH = PrecomputeConfig().batch_size  # precompute's forward calls, within a shard
EVALUATE_BATCH = EvaluateConfig().batch_size  # evaluate's predictions (core.training.predict)
MEASURE_BATCH = training.MEASURE_BATCH  # Trainee.measure's held-out batches


def teacher_forward(
    teacher, inputs: np.ndarray, shard_rows: int, batch_size: int = PRECOMPUTE_BATCH
) -> np.ndarray:
    """The teacher's own logits on `inputs` (every row of a cache, in its row order), in
    exactly the forward calls precompute makes (`pipeline.teacher.shards.forward_batches`): each
    shard of `shard_rows` rows (the cache's `attrs["shard_rows"]`) cut at the multiples of
    `batch_size`. `teacher`: a checkpoint path or a torch module.  # (N, C)"""
    if isinstance(teacher, (str, Path)):
        from pipeline.models.checkpoint import load_checkpoint

        teacher, _ = load_checkpoint(teacher)
    return _forward(teacher, inputs, forward_batches(len(inputs), shard_rows, batch_size))


def student_forward(model, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's logits on `inputs` in eval mode, in consecutive batches of `batch_size`
    rows, as stage two predicts and measures (EVALUATE_BATCH, MEASURE_BATCH).  # (N, C)"""
    model.eval()
    batches = [slice(s, s + batch_size) for s in range(0, len(inputs), batch_size)]
    return _forward(model, inputs, batches)


def _forward(model, inputs: np.ndarray, batches: list[slice]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [
                model(torch.from_numpy(np.ascontiguousarray(inputs[rows]))).float().numpy()
                for rows in batches
            ]
        )
