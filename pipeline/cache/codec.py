"""Logits ↔ stored words for each cache dtype (float32, float16, bfloat16 as raw uint16)."""

from __future__ import annotations

import numpy as np

from pipeline.cache.layout import stored_dtype


def encode(logits: np.ndarray, dtype: str) -> np.ndarray:
    """float32 logits → the array stored on disk for `dtype` (round to nearest even)."""
    if dtype == "bfloat16":
        import torch

        words = torch.from_numpy(np.ascontiguousarray(logits, np.float32)).to(torch.bfloat16)
        return words.view(torch.int16).numpy().view(np.uint16)
    with np.errstate(over="ignore"):  # float16 overflow becomes Inf, which the writer refuses
        return np.asarray(logits).astype(stored_dtype(dtype), copy=False)


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored words → float32 logits (bfloat16 and float16 widen exactly)."""
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: shift the word into place.
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def decode_torch(stored: np.ndarray, dtype: str):
    """Stored words → a torch tensor in the cache's own dtype (bfloat16 stays bfloat16)."""
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(stored))
