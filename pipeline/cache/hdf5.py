"""The HDF5 backend: one file, datasets chunked along N, with a checksum filter on every chunk
(format version 2); the interface and the read guard are `pipeline.cache.backends`'."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import schema
from pipeline.cache.backends import _block, _Guarded, _undecodable
from pipeline.core.errors import PipelineError, one_line


class HDF5Backend(_Guarded):
    """One HDF5 file; datasets chunked along N, gzip by default (zstd via hdf5plugin), with
    (format version 2) the fletcher32 checksum filter after it; attributes stored as JSON."""

    name = "hdf5"
    missing_word = "missing (no stored chunk)"

    def __init__(self, path: Path, mode: str):
        import h5py
        import hdf5plugin  # noqa: F401  (registers the zstd filter for reads and writes)

        super().__init__()
        self.path = Path(path)
        self._index: dict[str, list[Any]] = {}
        self._file = h5py.File(self.path, {"w": "w", "r": "r", "r+": "r+", "a": "a"}[mode])

    def create_array(self, name, shape, dtype, chunks, shards, compression, checksum=True):
        import hdf5plugin

        codec, level = compression
        kwargs: dict[str, Any] = {}
        if codec == "zstd":
            kwargs.update(hdf5plugin.Zstd(clevel=level))
        elif codec == "gzip":
            kwargs.update(compression="gzip", compression_opts=level)
        # h5py puts fletcher32 after the compressor in the pipeline: the checksum covers the
        # stored bytes and HDF5 checks it on every read (stock HDF5: plain h5py reads it).
        self._file.create_dataset(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            track_times=False,  # no timestamps: same inputs, same bytes
            fillvalue=0,
            fletcher32=checksum,
            **kwargs,
        )
        self._forget(name)

    def write(self, name, offset, data):
        self._file[name][_block(offset, data)] = data
        self._forget(name)

    def _read(self, name, rows):
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

    def _unit(self, name, axis):
        return self._file[name].chunks[axis]

    def _chunks(self, name: str) -> list[Any]:
        """Every stored chunk of `name` (offset, byte offset, size), from one index walk."""
        dsid = self._file[name].id
        found: list[Any] = []
        try:
            try:
                dsid.chunk_iter(found.append)  # one walk of the chunk index (HDF5 >= 1.12.3)
            except (AttributeError, NotImplementedError):
                found = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
        except (RuntimeError, OSError, ValueError) as e:  # what HDF5 makes of a bad index
            raise PipelineError(
                f"cache {self.path} is damaged: the chunk index of {name} cannot be read "
                f"({one_line(e, limit=100)}); re-run precompute-logits or restore the cache"
            ) from None
        return found

    def _stored_units(self, name, axis):
        ds = self._file[name]
        stored = {info.chunk_offset for info in self._chunks(name)}
        # A chunk spans one index of each axis before N (one member): a row range is whole
        # when the chunk of every such index is stored.
        leading = list(itertools.product(*(range(n) for n in ds.shape[:axis])))
        after = (0,) * (ds.ndim - axis - 1)
        unit = ds.chunks[axis]
        count = math.ceil(ds.shape[axis] / unit)
        return {
            u for u in range(count) if all((*lead, u * unit, *after) in stored for lead in leading)
        }

    def _reason(self, name, error):
        # fletcher32 runs first on read, so a failing filter on a checksummed dataset is the
        # checksum (HDF5 says only "filter returned failure").
        if self.checksummed(name) and "filter returned failure" in str(error):
            return "damaged (checksum mismatch)"
        return _undecodable(error)

    def checksummed(self, name):
        return bool(self._file[name].fletcher32)

    def shard_digests(self, name, shard_rows, shards=None):
        """sha256 over the stored bytes (as on disk: compressed, with the checksum) of each
        shard's chunks, in chunk-offset order."""
        ds, axis = self._file[name], schema.get(name).axis
        by_shard: dict[int, list[tuple[int, ...]]] = {}
        for info in self._chunks(name):
            by_shard.setdefault(info.chunk_offset[axis] // shard_rows, []).append(info.chunk_offset)
        digests: list[str | None] = []
        count = math.ceil(ds.shape[axis] / shard_rows)
        for k in range(count) if shards is None else shards:
            if k not in by_shard:
                digests.append(None)
                continue
            h = hashlib.sha256()
            for offset in sorted(by_shard[k]):
                h.update(ds.id.read_direct_chunk(offset)[1])
            digests.append(h.hexdigest())
        return digests

    def seal(self, name: str, k: int, shard_rows: int) -> str | None:
        """sha256 over shard k's chunks in offset order: each one's offset, size, filter mask
        and last 4 bytes as stored (with the fletcher32 filter, its checksum): a few small reads,
        and a chunk moved, copied or swapped in from elsewhere changes it."""
        axis, rows = schema.get(name).axis, shard_rows
        infos = sorted(
            (i for i in self._chunk_index(name) if i.chunk_offset[axis] // rows == k),
            key=lambda i: i.chunk_offset,
        )
        if not infos:
            return None
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for i in infos:
                last = os.pread(f.fileno(), 4, i.byte_offset + i.size - 4) if i.size >= 4 else b""
                h.update(json.dumps([list(i.chunk_offset), i.size, i.filter_mask]).encode())
                h.update(last)
        return h.hexdigest()

    def shard_seals(self, name: str, shard_rows: int) -> list[str | None]:
        self._file.flush()  # seals read the stored bytes from the file
        self._index.pop(name, None)
        return super().shard_seals(name, shard_rows)

    def _chunk_index(self, name: str) -> list[Any]:
        """The chunk index of `name` (one walk per open: the file is pinned by its stamp)."""
        if name not in self._index:
            self._index[name] = self._chunks(name)
        return self._index[name]

    def _seal_stamp(self, name: str, k: int) -> Any:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def shape(self, name):
        return tuple(self._file[name].shape)

    def dtype(self, name):
        return np.dtype(self._file[name].dtype)

    def has(self, name):
        return name in self._file

    def attrs(self):
        """Every attribute, decoded from the JSON it is stored as; damaged ones are one line."""
        try:
            # A damaged byte can decode to a lone surrogate, which no JSON text holds.
            return {k: json.loads(_utf8(v)) for k, v in self._file.attrs.items()}
        except (ValueError, TypeError, UnicodeError, KeyError, OSError) as e:
            raise PipelineError(
                f"cache {self.path} is damaged: its attributes cannot be read "
                f"({one_line(e, limit=150)}); re-run precompute-logits or restore the cache"
            ) from None

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


def _utf8(value: Any) -> Any:
    """`value` (a stored attribute), refused unless it is valid UTF-8 text."""
    if isinstance(value, str):
        value.encode("utf-8")
    return value
