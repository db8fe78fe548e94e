"""scikit-learn's bundled 8x8 digits: the built-in transfer set (no download)."""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data import Options, TransferSet, register_source

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@register_source("digits")
def digits(split: str, opts: Options) -> TransferSet:
    """scikit-learn's bundled 8x8 digits, split train or test (stratified 80/20).

    inputs (N, 1, 8, 8) float32, pixels in [0, 1]; sample ids are row numbers in sklearn's
    array, so the two splits never share one.
    """
    if split not in ("train", "test"):
        raise PipelineError(f"--data digits:{split}: split must be 'train' or 'test'")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    ids = np.arange(len(bunch.target), dtype=np.int64)
    train_ids, test_ids = train_test_split(
        ids, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=bunch.target
    )
    chosen = np.sort(train_ids if split == "train" else test_ids)
    inputs = (bunch.data[chosen] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return TransferSet(
        spec=f"digits:{split}",
        inputs=inputs,
        labels=bunch.target[chosen].astype(np.int64),
        sample_ids=chosen,
        class_names=[str(c) for c in bunch.target_names],
    )
