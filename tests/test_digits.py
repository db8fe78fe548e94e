"""The built-in digits transfer set and label masking."""

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data import Fingerprint, load_transfer_set, mask_labels


def test_digits_split_is_disjoint_stable_and_scaled():
    train, test = load_transfer_set("digits:train"), load_transfer_set("digits:test")
    assert len(train) == 1437 and len(test) == 360
    assert not set(train.sample_ids) & set(test.sample_ids)
    assert train.inputs.shape == (1437, 1, 8, 8) and train.inputs.dtype == np.float32
    assert 0.0 <= train.inputs.min() and train.inputs.max() == 1.0
    assert train.class_names == [str(i) for i in range(10)]
    again = load_transfer_set("digits:train")
    np.testing.assert_array_equal(again.sample_ids, train.sample_ids)
    assert again.fingerprint() == train.fingerprint() != test.fingerprint()


def test_fingerprint_does_not_depend_on_batching():
    ts = load_transfer_set("digits:test")
    whole = Fingerprint(ts.input_shape, "float32")
    whole.update(ts.sample_ids, ts.inputs)
    pieces = Fingerprint(ts.input_shape, "float32")
    for ids, x, _ in ts.batches(7):
        pieces.update(ids, x)
    assert whole.hexdigest() == pieces.hexdigest() == ts.fingerprint()


def test_fingerprint_sees_one_changed_pixel():
    ts = load_transfer_set("digits:test")
    before = ts.fingerprint()
    ts.inputs[100, 0, 3, 3] += 1e-3
    assert ts.fingerprint() != before


def test_mask_labels_keeps_a_seeded_fraction():
    labels = np.arange(1000) % 10
    masked = mask_labels(labels, 0.1, seed=3)
    kept = masked >= 0
    assert kept.sum() == 100
    np.testing.assert_array_equal(masked[kept], labels[kept])
    np.testing.assert_array_equal(mask_labels(labels, 0.1, seed=3), masked)
    assert not np.array_equal(mask_labels(labels, 0.1, seed=4), masked)
    assert (mask_labels(labels, 1.0, 0) == labels).all()
    assert (mask_labels(labels, 0.0, 0) == -1).all()


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("digits", "expected NAME:ARG"),
        ("nosuch:x", "unknown source 'nosuch'"),
        ("digits:valid", "split must be 'train' or 'test'"),
    ],
)
def test_bad_specs(spec, msg):
    with pytest.raises(PipelineError, match=msg):
        load_transfer_set(spec)
