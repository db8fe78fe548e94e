"""Two thin storage backends behind one interface: named arrays plus a JSON attribute dict.

Everything about *what* is stored lives in `schema.py`, `layout.py` and the writer/reader; a
backend only knows how to create, write and read a named chunked array in its format.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.cache import schema
from pipeline.errors import PipelineError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class Backend(Protocol):
    name: str
    path: Path

    def create_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        shards: tuple[int, ...],
        compression: tuple[str, int],
    ) -> None:
        """Create a chunked array; `shards` (a multiple of `chunks`) is Zarr's file unit."""

    def write(self, name: str, offset: int | tuple[int, ...], data: np.ndarray) -> None:
        """Write `data` as a block starting at `offset` (a row, or an index per leading axis)."""

    def read(
        self, name: str, rows: slice | tuple[slice, ...] | np.ndarray = slice(None)
    ) -> np.ndarray:
        """Rows of `name` (a slice or sorted-or-not row numbers along axis 0), or a block."""

    def missing_blocks(self, name: str) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of the N axis whose storage unit (Zarr shard file, HDF5
        chunk) was never written."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def has(self, name: str) -> bool: ...

    def attrs(self) -> dict[str, Any]: ...

    def set_attrs(self, values: dict[str, Any]) -> None: ...

    def replace_attrs(self, values: dict[str, Any]) -> None:
        """Make `values` the whole attribute dict (keys not in it are dropped)."""

    def close(self) -> None: ...


class ZarrBackend:
    """A Zarr v3 group in a directory; arrays sharded along N, zstd-compressed.

    zarr's local store writes every file to a temporary name and renames it, so a shard file or
    zarr.json is either whole or absent after a crash; `discard_unfinished_writes` sweeps the
    temporaries a killed process leaves behind.
    """

    name = "zarr"

    def __init__(self, path: Path, mode: str):
        import zarr

        self.path = Path(path)
        self._group = zarr.open_group(str(self.path), mode=mode, zarr_format=3)

    def create_array(self, name, shape, dtype, chunks, shards, compression):
        from zarr.codecs import ZstdCodec

        codec, level = compression
        self._group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=ZstdCodec(level=level) if codec == "zstd" else None,
            fill_value=0,
        )

    def write(self, name, offset, data):
        # Store every chunk, even one equal to the fill value: then a missing file always means
        # a missing shard, which `missing_blocks` can report.
        arr = self._group[name].with_config({"write_empty_chunks": True})
        arr[_block(offset, data)] = data

    def read(self, name, rows=slice(None)):
        arr = self._group[name]
        if isinstance(rows, (slice, tuple)):
            return arr[rows]
        return arr.get_orthogonal_selection((np.asarray(rows),))

    def missing_blocks(self, name):
        arr, axis = self._group[name], schema.get(name).axis
        unit = (arr.shards or arr.chunks)[axis]
        missing = []
        for start in range(0, arr.shape[axis], unit):
            coords = [0] * arr.ndim
            coords[axis] = start // unit
            key = arr.metadata.encode_chunk_key(tuple(coords))
            if not (self.path / name / key).is_file():
                missing.append((start, min(start + unit, arr.shape[axis])))
        return missing

    def shape(self, name):
        return tuple(self._group[name].shape)

    def dtype(self, name):
        return np.dtype(self._group[name].dtype)

    def has(self, name):
        return name in self._group

    def attrs(self):
        return dict(self._group.attrs)

    def set_attrs(self, values):
        self._group.attrs.update(values)

    def replace_attrs(self, values):
        self._group.attrs.put(values)

    def discard_unfinished_writes(self) -> None:
        """Remove the temporaries of writes a killed process never renamed into place."""
        for p in self.path.rglob("*.partial"):
            if _ZARR_TEMPORARY.search(p.name) and p.is_file():
                p.unlink()

    def close(self):
        pass


# zarr.storage.LocalStore writes `key` as `key-with-suffix-replaced.<uuid4 hex>.partial`.
_ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


class HDF5Backend:
    """One HDF5 file; datasets chunked along N, zstd via hdf5plugin; attributes stored as JSON."""

    name = "hdf5"

    def __init__(self, path: Path, mode: str):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the zstd filter for reads and writes)

        self.path = Path(path)
        self._file = h5py.File(self.path, {"w": "w", "r": "r", "r+": "r+", "a": "a"}[mode])

    def create_array(self, name, shape, dtype, chunks, shards, compression):
        import hdf5plugin

        codec, level = compression
        kwargs: dict[str, Any] = {}
        if codec == "zstd":
            kwargs.update(hdf5plugin.Zstd(clevel=level))
        self._file.create_dataset(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            track_times=False,  # no timestamps: same inputs, same bytes
            fillvalue=0,
            **kwargs,
        )

    def write(self, name, offset, data):
        self._file[name][_block(offset, data)] = data

    def read(self, name, rows=slice(None)):
        ds = self._file[name]
        if isinstance(rows, (slice, tuple)):
            return ds[rows]
        # h5py needs strictly increasing fancy indices: sort, read, restore the order.
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        out = ds[uniq][inverse]
        result = np.empty_like(out)
        result[order] = out
        return result

    def missing_blocks(self, name):
        ds, axis = self._file[name], schema.get(name).axis
        unit = ds.chunks[axis]
        stored = {ds.id.get_chunk_info(i).chunk_offset for i in range(ds.id.get_num_chunks())}
        # A chunk spans one index of each axis before N (one member): a row range is whole
        # when the chunk of every such index is stored.
        leading = list(itertools.product(*(range(n) for n in ds.shape[:axis])))
        after = (0,) * (ds.ndim - axis - 1)
        missing = []
        for start in range(0, ds.shape[axis], unit):
            if not all((*lead, start, *after) in stored for lead in leading):
                missing.append((start, min(start + unit, ds.shape[axis])))
        return missing

    def shape(self, name):
        return tuple(self._file[name].shape)

    def dtype(self, name):
        return np.dtype(self._file[name].dtype)

    def has(self, name):
        return name in self._file

    def attrs(self):
        return {k: json.loads(v) for k, v in self._file.attrs.items()}

    def set_attrs(self, values):
        for k, v in values.items():
            self._file.attrs[k] = json.dumps(v)
        self._file.flush()

    def replace_attrs(self, values):
        for k in list(self._file.attrs):
            del self._file.attrs[k]
        self.set_attrs(values)

    def close(self):
        self._file.close()


def _block(offset: int | tuple[int, ...], data: np.ndarray) -> tuple[slice, ...]:
    offset = (offset,) if isinstance(offset, int) else tuple(offset)
    return tuple(slice(o, o + n) for o, n in zip(offset, data.shape, strict=False))


BACKENDS = {"zarr": ZarrBackend, "hdf5": HDF5Backend}


def format_for_path(path: str | Path, requested: str = "auto") -> str:
    """The backend for an output path: explicit, else by suffix (.h5/.hdf5 → hdf5, else zarr)."""
    if requested == "auto":
        return "hdf5" if Path(path).suffix.lower() in (".h5", ".hdf5") else "zarr"
    if requested not in BACKENDS:
        raise PipelineError(f"--format {requested!r}: expected zarr or hdf5")
    return requested


def detect_format(path: Path) -> str:
    """Which backend wrote an existing cache at `path`."""
    if path.is_dir():
        if (path / "zarr.json").is_file():
            return "zarr"
        raise PipelineError(f"{path}: a directory but not a Zarr v3 group (no zarr.json)")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(8) == HDF5_SIGNATURE:
                return "hdf5"
        raise PipelineError(f"{path}: neither a Zarr directory nor an HDF5 file")
    raise PipelineError(f"cache not found: {path}")


def open_backend(path: str | Path, mode: str, fmt: str | None = None) -> Backend:
    path = Path(path)
    fmt = fmt or detect_format(path)
    try:
        return BACKENDS[fmt](path, mode)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot open as {fmt} ({e})") from None
