"""Every transfer-set format end to end: cached logits equal the teacher's own outputs on the
inputs the source reads, and a student trains from the cache (CLI, as a user runs it)."""

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.data import load_transfer_set
from tests.conftest import invoke
from tests.formats import (
    pixels,
    precompute,
    save_torchscript,
    tiny_net,
    write_cifar10,
    write_cifar100,
    write_images,
)
from tests.reference import teacher_forward


def _npz(root):
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x=rng.normal(size=(9, 2, 5, 5)), y=np.arange(9) % 3)
    return f"npz:{root / 'd.npz'}", 2, 3


def _npy(root):
    np.save(root / "x.npy", pixels(8, (1, 4, 4), seed=1))
    return f"npy:{root / 'x.npy'}?std=255", 1, 3


def _imagefolder(root):
    write_images(root / "imgs", {"a": pixels(4, (6, 6, 3), 2), "b": pixels(3, (7, 5, 3), 3)})
    return f"imagefolder:{root / 'imgs'}?size=6&mean=0.5,0.5,0.5&std=0.25", 3, 3


def _cifar10(root):
    write_cifar10(root / "cifar-10-batches-py")
    return f"cifar10:{root}", 3, 10


def _cifar100(root):
    write_cifar100(root / "cifar-100-python")
    return f"cifar100:{root / 'cifar-100-python'}?labels=coarse", 3, 20


def _zarr(root):
    import zarr

    group = zarr.open_group(str(root / "d.zarr"), mode="w")
    group.create_array("x", data=pixels(6, (2, 3, 3), seed=4).astype(np.float32))
    group.create_array("y", data=np.array([0, 1, 2, 0, 1, 2]))
    return f"zarr:{root / 'd.zarr'}?std=255", 2, 3


def _hdf5(root):
    import h5py

    with h5py.File(root / "d.h5", "w") as f:
        f["images"] = np.random.default_rng(5).normal(size=(7, 1, 4, 3)).astype(np.float32)
        f["ids"] = np.arange(7) * 10
    return f"hdf5:{root / 'd.h5'}#images", 1, 3


@pytest.mark.parametrize(
    "make", [_npz, _npy, _imagefolder, _cifar10, _cifar100, _zarr, _hdf5], ids=lambda f: f.__name__
)
def test_each_format_caches_the_teachers_outputs_and_trains_a_student(tmp_path, runner, make):
    spec, channels, classes = make(tmp_path)
    model = tiny_net(channels, classes)
    teacher = save_torchscript(model, tmp_path / "teacher.pt")
    cache = tmp_path / "cache.zarr"
    result = precompute(runner, teacher, spec, cache)
    assert result.exit_code == 0, result.output

    ts = load_transfer_set(spec)
    with open_cache(cache) as c:
        want = teacher_forward(model, ts.inputs, c.attrs["shard_rows"])
        np.testing.assert_array_equal(c.logits()[:, 0], want)
        np.testing.assert_array_equal(c.sample_ids, ts.sample_ids)
        np.testing.assert_array_equal(c.labels, ts.labels)
        assert c.attrs["data"]["fingerprint"] == ts.fingerprint()

    # Unlabelled data trains on soft targets alone (alpha 1).
    alpha = "0.5" if ts.num_labelled else "1"
    args = ["--cache", cache, "--data", spec, "--out", tmp_path / "student", "--student", "mlp"]
    result = invoke(runner, "train-student", *args, "--epochs", "1", "--alpha", alpha)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "student" / "student.pt").is_file()


@pytest.mark.parametrize("make", [_npy, _imagefolder, _hdf5], ids=lambda f: f.__name__)
def test_precompute_reads_inputs_batch_by_batch_never_whole(tmp_path, runner, make, monkeypatch):
    """Stage one never materialises lazy inputs, so a transfer set larger than memory works."""
    from pipeline.data import TransferSet

    spec, channels, classes = make(tmp_path)
    ts = load_transfer_set(spec)  # the reference, read whole before the guard goes in

    def refuse(self):
        raise AssertionError("precompute loaded the whole transfer set")

    monkeypatch.setattr(TransferSet, "materialize", refuse)
    model = tiny_net(channels, classes)
    teacher = save_torchscript(model, tmp_path / "teacher.pt")
    result = precompute(runner, teacher, spec, tmp_path / "c.zarr")
    assert result.exit_code == 0, result.output
    with open_cache(tmp_path / "c.zarr") as c:
        want = teacher_forward(model, ts.inputs, c.attrs["shard_rows"])
        np.testing.assert_array_equal(c.logits()[:, 0], want)
        assert c.attrs["data"]["fingerprint"] == ts.fingerprint()
