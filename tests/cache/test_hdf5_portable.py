"""An HDF5 cache opens in any HDF5 reader: gzip (stock deflate) and fletcher32 by default,
never a plugin filter unless asked for."""

from __future__ import annotations

import sys

import numpy as np

from pipeline.cache import open_cache
from tests import procs
from tests.conftest import invoke

PLAIN_H5PY = """
import sys
import h5py
with h5py.File(sys.argv[1], "r") as f:
    ds = f["logits"]
    filters = sorted(ds._filters)
    values = ds[:]
print(filters, "hdf5plugin" in sys.modules, values.shape)
"""


def plain_h5py(path) -> str:
    """What a colleague's h5py (no hdf5plugin imported) sees."""
    out = procs.run([sys.executable, "-c", PLAIN_H5PY, str(path)])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_precompute_hdf5_defaults_to_gzip_and_opens_without_plugins(test_cache):
    with open_cache(test_cache) as cache:
        assert cache.attrs["compression"] == "gzip:4"
        n = cache.num_samples
    assert plain_h5py(test_cache) == f"['fletcher32', 'gzip'] False ({n}, 1, 10)"


def test_convert_to_hdf5_recompresses_for_portability(tmp_path, runner, train_cache):
    out = tmp_path / "c.h5"
    assert invoke(runner, "convert-cache", train_cache, out).exit_code == 0
    with open_cache(train_cache) as zarr_cache, open_cache(out) as h5:
        assert zarr_cache.attrs["compression"] == "zstd:3"
        assert h5.attrs["compression"] == "gzip:4"
        np.testing.assert_array_equal(h5.logits(), zarr_cache.logits())
    assert plain_h5py(out).startswith("['fletcher32', 'gzip'] False")

    kept = tmp_path / "kept.h5"
    args = ["convert-cache", train_cache, kept, "--compression", "keep"]
    assert invoke(runner, *args).exit_code == 0
    with open_cache(kept) as h5:
        assert h5.attrs["compression"] == "zstd:3"  # zstd: readers need hdf5plugin
