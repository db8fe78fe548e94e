"""Transfer-set sources: npz, npy, zarr, hdf5, image folders, CIFAR batches; lazy inputs."""

import hashlib
import pickle

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data import Fingerprint, LazyInputs, list_sources, load_transfer_set
from tests.conftest import invoke
from tests.formats import pixels, write_cifar10, write_cifar100, write_images


def test_every_source_is_registered_and_listed(runner):
    names = ["cifar10", "cifar100", "digits", "hdf5", "imagefolder", "npy", "npz", "zarr"]
    assert list_sources() == names
    result = invoke(runner, "sources")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.splitlines() if not line[0].isspace()]
    assert listed == [*names, "jsonl", "pystdlib", "tokens"]  # then the sequence sources
    assert "options: size, mode, workers, mean, std" in result.output


# --- arrays -------------------------------------------------------------------------------


def test_npz_reads_x_y_ids_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2, 3, 3))  # float64 on disk: cast to float32
    ids = np.array([50, 10, 40, 20, 30, 60])
    y = np.array([0, 1, -1, 1, 0, 1])
    np.savez(tmp_path / "d.npz", x=x, y=y, ids=ids, class_names=np.array(["no", "yes"]))
    ts = load_transfer_set(f"npz:{tmp_path / 'd.npz'}")
    assert isinstance(ts.inputs, np.ndarray) and ts.inputs.dtype == np.float32
    np.testing.assert_array_equal(ts.inputs, x.astype(np.float32))
    np.testing.assert_array_equal(ts.sample_ids, ids)
    np.testing.assert_array_equal(ts.labels, y)
    assert ts.labels.dtype == ts.sample_ids.dtype == np.int64
    assert ts.class_names == ["no", "yes"] and ts.num_labelled == 5

    normed = load_transfer_set(f"npz:{tmp_path / 'd.npz'}?mean=0.5,-1&std=2,4")
    mean = np.array([0.5, -1], np.float32).reshape(1, 2, 1, 1)
    std = np.array([2, 4], np.float32).reshape(1, 2, 1, 1)
    np.testing.assert_array_equal(normed.inputs, (x.astype(np.float32) - mean) / std)
    assert normed.fingerprint() != ts.fingerprint()


def test_npz_without_labels_or_ids_is_unlabelled_with_row_ids(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.ones((4, 5), np.float32))
    ts = load_transfer_set(f"npz:{tmp_path / 'u.npz'}")
    assert (ts.labels == -1).all() and ts.num_labelled == 0
    np.testing.assert_array_equal(ts.sample_ids, np.arange(4))
    assert ts.input_shape == (5,) and ts.class_names is None


def test_npy_is_memory_mapped_and_read_on_demand(tmp_path):
    x = pixels(7, (1, 4, 4), seed=1)
    np.save(tmp_path / "x.npy", x)
    ts = load_transfer_set(f"npy:{tmp_path / 'x.npy'}?std=255", lazy=True)  # uint8 → [0, 1]
    assert isinstance(ts.inputs, LazyInputs) and ts.inputs.shape == (7, 1, 4, 4)
    expected = x.astype(np.float32) / np.float32(255)
    eager = load_transfer_set(f"npy:{tmp_path / 'x.npy'}?std=255")  # the default: one array
    assert isinstance(eager.inputs, np.ndarray)
    np.testing.assert_array_equal(eager.inputs, expected)
    assert eager.fingerprint() == ts.fingerprint()
    np.testing.assert_array_equal(ts.inputs[:], expected)
    np.testing.assert_array_equal(ts.inputs[2:5], expected[2:5])
    assert ts.inputs[:].flags.writeable  # a copy, never the read-only map (torch warns on it)
    assert (ts.labels == -1).all()
    np.testing.assert_array_equal(ts.sample_ids, np.arange(7))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_stored_arrays_with_labels_and_ids_beside_the_inputs(tmp_path, fmt):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 3, 2, 2)).astype(np.float32)
    y = rng.integers(0, 4, 9)
    ids = rng.permutation(100)[:9]
    if fmt == "zarr":
        import zarr

        path = tmp_path / "d.zarr"
        root = zarr.open_group(str(path), mode="w")
        group = root.create_group("g")
        for name, value in (("x", x), ("y", y), ("ids", ids), ("targets", y[::-1].copy())):
            group.create_array(name, data=value, chunks=(4, *value.shape[1:]))
    else:
        import h5py

        path = tmp_path / "d.h5"
        with h5py.File(path, "w") as f:
            for name, value in (("x", x), ("y", y), ("ids", ids), ("targets", y[::-1].copy())):
                f.create_dataset(f"g/{name}", data=value, chunks=(4, *value.shape[1:]))
    ts = load_transfer_set(f"{fmt}:{path}#g/x", lazy=True)
    assert isinstance(ts.inputs, LazyInputs)
    np.testing.assert_array_equal(ts.inputs[:], x)
    np.testing.assert_array_equal(ts.inputs[np.array([7, 1, 7])], x[[7, 1, 7]])
    np.testing.assert_array_equal(ts.labels, y)
    np.testing.assert_array_equal(ts.sample_ids, ids)
    named = load_transfer_set(f"{fmt}:{path}#g/x?labels=g/targets")
    np.testing.assert_array_equal(named.labels, y[::-1])
    assert named.fingerprint() == ts.fingerprint()  # labels are not part of the fingerprint

    with pytest.raises(PipelineError, match=r"no array 'nope' .*\(has: .*g/x"):
        load_transfer_set(f"{fmt}:{path}#nope")
    with pytest.raises(PipelineError, match="option labels='g/missing': no such array"):
        load_transfer_set(f"{fmt}:{path}#g/x?labels=g/missing")


def test_a_bare_zarr_array_is_unlabelled_inputs(tmp_path):
    import zarr

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    zarr.create_array(str(tmp_path / "x.zarr"), data=x, chunks=(4, 4))
    ts = load_transfer_set(f"zarr:{tmp_path / 'x.zarr'}")
    np.testing.assert_array_equal(ts.inputs[:], x)
    assert (ts.labels == -1).all()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"inputs": np.ones((3, 2))}, r"has no array 'x' \(has: inputs\)"),
        ({"x": np.ones((3, 2)), "y": np.eye(3)}, r"y must be \(3,\) integer .*one-hot"),
        ({"x": np.ones((3, 2)), "ids": np.array([1, 1, 2])}, "sample ids are not unique"),
        ({"x": np.ones(3)}, r"x must be \(N, \.\.\.\) per sample"),
        ({"x": np.ones((3, 2)), "names": np.array([{}], dtype=object)}, "holds Python objects"),
    ],
)
def test_bad_npz_files(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PipelineError, match=message):
        load_transfer_set(f"npz:{tmp_path / 'bad.npz'}")


# --- lazy inputs and batching ---------------------------------------------------------------


def test_lazy_inputs_index_like_numpy():
    data = np.random.default_rng(3).normal(size=(10, 2, 3)).astype(np.float32)
    calls = []

    def read(rows):
        calls.append(rows.copy())
        assert (np.diff(rows) > 0).all()  # sorted, no duplicates: what on-disk readers want
        return data[rows]

    lazy = LazyInputs(10, (2, 3), read)
    mask = np.arange(10) % 3 == 0
    for key in (4, -1, slice(2, 9, 3), slice(None), mask, np.array([9, 0, 9, 4]), (3, 1)):
        np.testing.assert_array_equal(lazy[key], data[key])
    np.testing.assert_array_equal(lazy[np.array([], int)], data[:0])
    np.testing.assert_array_equal(np.asarray(lazy), data)
    assert lazy.shape == (10, 2, 3) and len(lazy) == 10 and lazy.dtype == np.float32
    np.testing.assert_array_equal(calls[4], np.flatnonzero(mask))  # reads only what is named


def test_image_batches_use_workers_in_order_and_fingerprint_on_the_fly(tmp_path):
    imgs = pixels(7, (5, 6, 3), seed=4)
    write_images(tmp_path / "f", {"a": imgs[:3], "b": imgs[3:]})
    serial = load_transfer_set(f"imagefolder:{tmp_path / 'f'}?workers=0", lazy=True)
    parallel = load_transfer_set(f"imagefolder:{tmp_path / 'f'}?workers=2", lazy=True)
    assert parallel.inputs.workers == 2
    got = list(parallel.batches(2))
    assert [len(ids) for ids, _, _ in got] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([ids for ids, _, _ in got]), serial.sample_ids)
    np.testing.assert_array_equal(np.concatenate([x for _, x, _ in got]), serial.inputs[:])
    fp = Fingerprint(parallel.input_shape, "float32")
    for ids, x, _ in got:
        fp.update(ids, x)
    assert fp.hexdigest() == serial.fingerprint() == parallel.fingerprint()
    parts = list(serial.read_ranges([slice(5, 7), slice(0, 1)]))
    np.testing.assert_array_equal(parts[0][1], serial.inputs[5:7])
    np.testing.assert_array_equal(parts[1][2], serial.labels[:1])


# --- image folders -------------------------------------------------------------------------


def test_imagefolder_decodes_exact_pixels_labels_and_path_ids(tmp_path):
    cats, dogs = pixels(2, (5, 6, 3), seed=5), pixels(3, (5, 6, 3), seed=6)
    write_images(tmp_path / "f", {"dog": dogs, "cat": cats})
    ts = load_transfer_set(f"imagefolder:{tmp_path / 'f'}")
    assert ts.class_names == ["cat", "dog"]  # sorted folder names
    np.testing.assert_array_equal(ts.labels, [0, 0, 1, 1, 1])
    assert ts.inputs.shape == (5, 3, 5, 6) and ts.inputs.dtype == np.float32
    # PNG is lossless: the inputs are the pixels / 255, channels first (ToTensor's numbers).
    expected = np.concatenate([cats, dogs]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_array_equal(ts.inputs[:], expected)
    key = "dog/img001"
    digest = hashlib.sha256(key.encode()).digest()
    assert ts.sample_ids[3] == int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_imagefolder_resize_mode_and_normalisation(tmp_path):
    from PIL import Image

    imgs = [pixels(1, (8, 10, 3), seed=7)[0], pixels(1, (6, 6, 3), seed=8)[0]]  # mixed sizes
    paths = write_images(tmp_path / "f", {"only": imgs})
    ts = load_transfer_set(f"imagefolder:{tmp_path / 'f'}?size=4x5&mean=0.5&std=0.25")
    assert ts.inputs.shape == (2, 3, 4, 5)
    for i, path in enumerate(paths):
        resized = np.asarray(Image.open(path).convert("RGB").resize((5, 4), Image.BILINEAR))
        expected = (resized.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.25
        np.testing.assert_array_equal(ts.inputs[i], expected)
    gray = load_transfer_set(f"imagefolder:{tmp_path / 'f'}?size=3&mode=L")
    assert gray.input_shape == (1, 3, 3)
    np.testing.assert_array_equal(
        gray.inputs[1, 0] * 255,
        np.asarray(Image.open(paths[1]).convert("L").resize((3, 3), Image.BILINEAR)),
    )


def test_flat_folder_is_unlabelled_and_ids_match_across_file_formats(tmp_path):
    imgs = pixels(3, (4, 4, 3), seed=9)
    write_images(tmp_path / "rgb", {"": imgs}, suffix=".png")
    write_images(tmp_path / "other", {"": imgs[:, :, :, 0]}, suffix=".bmp")
    rgb = load_transfer_set(f"imagefolder:{tmp_path / 'rgb'}")
    other = load_transfer_set(f"imagefolder:{tmp_path / 'other'}?mode=L")
    assert (rgb.labels == -1).all() and rgb.class_names is None
    np.testing.assert_array_equal(rgb.sample_ids, other.sample_ids)  # same names, other format
    assert rgb.input_shape == (3, 4, 4) and other.input_shape == (1, 4, 4)


def _corrupt_header(root):
    write_images(root, {"a": pixels(2, (4, 4, 3), 0)})
    (root / "a" / "img001.png").write_bytes(b"this is no image")


def _truncated(root):
    write_images(root, {"a": pixels(3, (16, 16, 3), 0)})
    path = root / "a" / "img002.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixel data cut


def _empty_class(root):
    write_images(root, {"a": pixels(1, (4, 4, 3), 0)})
    (root / "b").mkdir()


def _mixed_sizes(root):
    write_images(root, {"a": pixels(1, (4, 4, 3), 0), "b": pixels(1, (4, 5, 3), 1)})


def _loose_image(root):
    write_images(root, {"a": pixels(1, (4, 4, 3), 0), "": pixels(1, (4, 4, 3), 0)})


def _same_stem(root):
    write_images(root, {"a": pixels(1, (4, 4, 3), 0)}, suffix=".png")
    write_images(root, {"a": pixels(1, (4, 4, 3), 0)}, suffix=".bmp")


@pytest.mark.parametrize(
    "make, message",
    [
        (_corrupt_header, "unreadable image .*img001.png"),
        (_empty_class, r"class folder .*b has no images"),
        (
            _mixed_sizes,
            r"images differ in size \(.*a/img000.png is 4x4, .*b/img000.png is 4x5\); "
            r"give one with \?size=HxW",
        ),
        (_loose_image, "img000.png lies beside the class folders"),
        (lambda root: root.mkdir(), "no images in"),
        (_same_stem, "differ only in the extension"),
    ],
)
def test_bad_image_folders(tmp_path, make, message):
    make(tmp_path / "f")
    with pytest.raises(PipelineError, match=message):
        load_transfer_set(f"imagefolder:{tmp_path / 'f'}")


def test_a_truncated_image_is_named_even_when_decoded_in_a_worker(tmp_path):
    _truncated(tmp_path / "f")
    spec = f"imagefolder:{tmp_path / 'f'}?workers=1"
    ts = load_transfer_set(spec, lazy=True)  # the headers are fine
    with pytest.raises(PipelineError) as info:
        list(ts.batches(1))
    with pytest.raises(PipelineError) as eager:
        load_transfer_set(spec)  # decodes everything at once
    for message in (str(info.value), str(eager.value)):
        assert "unreadable image" in message and "img002.png" in message
        assert "\n" not in message and "Traceback" not in message


# --- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_batches_as_distributed(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path / "cifar-10-batches-py")
    train = load_transfer_set(f"cifar10:{tmp_path}")  # the folder the archive unpacked into
    assert train.inputs.shape == (12, 3, 32, 32) and train.input_shape == (3, 32, 32)
    # Row-major planes: the first 1024 bytes are red, then green, then blue.
    i = 7
    red = train_x[i, :1024].reshape(32, 32).astype(np.float32) / 255
    np.testing.assert_array_equal(train.inputs[i, 0], red)
    np.testing.assert_array_equal(
        train.inputs[:], train_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255
    )
    np.testing.assert_array_equal(train.labels, train_y)
    np.testing.assert_array_equal(train.sample_ids, np.arange(12))
    assert train.class_names[:3] == ["airplane", "automobile", "bird"]

    test = load_transfer_set(f"cifar10:{tmp_path / 'cifar-10-batches-py'}?split=test&mean=0.5")
    np.testing.assert_array_equal(
        test.inputs[:], test_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255 - 0.5
    )
    np.testing.assert_array_equal(test.labels, test_y)


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_fine_and_coarse_labels(tmp_path, labels):
    files = write_cifar100(tmp_path / "cifar-100-python")
    ts = load_transfer_set(f"cifar100:{tmp_path / 'cifar-100-python'}?split=test&labels={labels}")
    x, fine, coarse = files["test"]
    np.testing.assert_array_equal(ts.inputs[:], x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    np.testing.assert_array_equal(ts.labels, fine if labels == "fine" else coarse)
    assert len(ts.class_names) == (100 if labels == "fine" else 20)
    assert ts.class_names[1] == f"{labels}1"


class _Evil:
    def __reduce__(self):
        return (print, ("pickles can run code",))


def test_cifar_refuses_pickles_that_run_code_and_names_missing_files(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil()}, f, protocol=2)
    with pytest.raises(
        PipelineError, match=r"data_batch_2 is not a CIFAR batch file .*refusing to load .*print"
    ):
        load_transfer_set(f"cifar10:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no data_batch_1..5 in .*empty .*cifar-10-batches-py"):
        load_transfer_set(f"cifar10:{tmp_path / 'empty'}")
    with pytest.raises(PipelineError, match="no 'train' file in .*cifar-100-python"):
        load_transfer_set(f"cifar100:{tmp_path / 'empty'}")


# --- spec options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("digits:train?size=3", r"unknown option 'size' \(valid: none\)"),
        ("npz:{d}/x.npz?sise=3", r"unknown option 'sise' \(valid: mean, std\)"),
        ("npz:{d}/x.npz?mean", "option 'mean' needs a value"),
        ("npz:{d}/x.npz?mean=a,b", "option mean='a,b': expected comma-separated numbers"),
        ("npz:{d}/x.npz?mean=1,2,3", "option mean has 3 values; the data has 2 channels"),
        ("npz:{d}/x.npz?std=0", "option std='0': expected non-zero numbers"),
        ("imagefolder:{d}/imgs?size=big", "option size='big': expected N or HxW"),
        ("imagefolder:{d}/imgs?mode=CMYK", "option mode='CMYK': expected RGB or L or RGBA"),
        ("cifar10:{d}?split=val", "option split='val': expected train or test"),
        ("npz:{d}/gone.npz", "file not found: .*gone.npz"),
    ],
)
def test_bad_options_name_the_option(tmp_path, spec, message):
    np.savez(tmp_path / "x.npz", x=np.ones((2, 2, 3)))
    write_images(tmp_path / "imgs", {"a": pixels(1, (4, 4, 3), 0)})
    with pytest.raises(PipelineError, match=message):
        load_transfer_set(spec.format(d=tmp_path))
