"""A picture of dark knowledge: one sample's teacher distribution at several temperatures,
read from a cache (the classic "a 7 that looks like a 1" figure of Hinton et al. 2015).

A higher T flattens softmax(t / T) and shows how the teacher ranks the wrong classes: the
information a student gets from soft targets and not from labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

DEFAULT_TEMPERATURES = (1.0, 4.0, 8.0)


def softmax_at(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the last axis, in float64.  # (..., C)"""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ambiguous_ids(logits: np.ndarray, ids: np.ndarray, count: int) -> list[int]:
    """The `count` sample ids whose teacher is least sure at T = 1: smallest gap between its
    top two probabilities (ties broken by id, so the choice is stable).  logits (N, C)"""
    p = np.sort(softmax_at(logits, 1.0), axis=-1)
    gap = p[:, -1] - p[:, -2]  # (N,)
    order = np.lexsort((ids, gap))
    return [int(i) for i in ids[order[:count]]]


def read_targets(cache_path: Path, ids: list[int] | None, count: int = 4) -> dict[str, Any]:
    """View 0 of the teacher's logits for sample `ids` (default: the `count` most ambiguous),
    with their labels and the class names."""
    from pipeline.cache import open_cache

    with open_cache(cache_path) as cache:
        cache.require_complete()
        all_ids = cache.sample_ids
        if ids is None:
            ids = ambiguous_ids(cache.logits()[:, 0], all_ids, count)
        rows = cache.rows_for(np.asarray(ids, dtype=np.int64))
        logits = cache.logits(np.sort(rows))[:, 0]  # (n, C) in row order
        logits = logits[np.argsort(np.argsort(rows))]  # back to the order of `ids`
        labels = cache.labels[rows]
        names = cache.attrs.get("class_names") or [str(c) for c in range(cache.num_classes)]
    return {"ids": list(ids), "logits": logits, "labels": labels, "class_names": names}


def plot_targets(targets: dict[str, Any], temperatures: tuple[float, ...], out: Path) -> Path:
    """One panel per sample: its class probabilities at each temperature, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not temperatures or any(not np.isfinite(t) or t <= 0 for t in temperatures):
        raise PipelineError(f"--temperatures {list(temperatures)}: each must be > 0")
    n, names = len(targets["ids"]), targets["class_names"]
    fig, axes = plt.subplots(n, 1, figsize=(max(6.4, 0.5 * len(names)), 2.4 * n), squeeze=False)
    width = 0.8 / len(temperatures)
    x = np.arange(len(names))
    for ax, sid, z, y in zip(
        axes[:, 0], targets["ids"], targets["logits"], targets["labels"], strict=True
    ):
        for i, t in enumerate(temperatures):
            ax.bar(x + (i - (len(temperatures) - 1) / 2) * width, softmax_at(z, t), width,
                   label=f"T = {t:g}")  # fmt: skip
        label = names[y] if y >= 0 else "unknown"
        top = names[int(z.argmax())]
        ax.set_title(f"sample id {sid}: label {label}, teacher's top class {top}", fontsize=9)
        ax.set_xticks(x, [str(c) for c in names], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out
