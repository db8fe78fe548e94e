"""Combining per-member teacher logits into one target, at the student's temperature.

Averaging probabilities at temperature T is not softmax(mean logits / T), so a cache that keeps
`members/logits` lets stage two choose. Both methods return *logits* such that
softmax(out / T) is the combined distribution, so every loss consumes them unchanged.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError

COMBINE_METHODS = ("mean-logits", "mean-probs")


def combine_members(members: np.ndarray, method: str, temperature: float) -> np.ndarray:
    """Combine member logits (M, ..., C) into target logits (..., C).

    mean-logits: mean_m z_m (independent of T).
    mean-probs:  T · log(mean_m softmax(z_m / T)), so softmax(out / T) = mean_m softmax(z_m / T).
    """
    if method == "mean-logits":
        return members.mean(axis=0, dtype=np.float64).astype(np.float32)
    if method == "mean-probs":
        if temperature <= 0:
            raise PipelineError(f"temperature must be > 0, got {temperature}")
        z = members.astype(np.float64) / temperature
        log_p = z - _logsumexp(z)  # (M, ..., C) member log-probabilities at T
        log_mean = _logsumexp(log_p, axis=0)[0] - np.log(len(members))
        return (temperature * log_mean).astype(np.float32)
    raise PipelineError(f"combine {method!r}: expected one of {', '.join(COMBINE_METHODS)}")


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
