"""Two thin storage backends behind one interface: named arrays plus a JSON attribute dict.

Everything about *what* is stored lives in `schema.py`, `layout.py` and the writer/reader; a
backend only knows how to create, write and read a named chunked array in its format.

Every read is guarded the same way in both formats (`_Guarded.read`): rows whose storage unit
(Zarr shard file, HDF5 chunk) was never written are refused instead of reading as the fill
value, and a chunk that fails its checksum or does not decode is reported as `DamagedData`,
one line naming the cache, the node and the rows, never as a library traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.cache import schema, store
from pipeline.cache.store import Location
from pipeline.core.errors import PipelineError, one_line

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
Rows = slice | tuple[slice, ...] | np.ndarray


class DamagedData(PipelineError):
    """Rows of a node whose stored bytes cannot be trusted: missing, failing their checksum or
    not decodable. `reason` reads after "stored data is", e.g. "damaged (checksum mismatch)"."""

    def __init__(self, path: Path, node: str, start: int, stop: int, reason: str):
        self.path, self.node, self.start, self.stop, self.reason = path, node, start, stop, reason
        super().__init__(
            f"{path}: {node} rows {start}-{stop - 1}: stored data is {reason}; "
            "re-run precompute-logits or restore the cache"
        )

    @property
    def short(self) -> str:
        """The problem without the path and the advice, for verify's list."""
        return f"{self.node}: rows {self.start}-{self.stop - 1} {self.reason}"


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
        checksum: bool = True,
    ) -> None:
        """Create a chunked array; `shards` (a multiple of `chunks`) is Zarr's file unit;
        `checksum` adds one to every stored chunk (format version 2)."""

    def write(self, name: str, offset: int | tuple[int, ...], data: np.ndarray) -> None:
        """Write `data` as a block starting at `offset` (a row, or an index per leading axis)."""

    def read(self, name: str, rows: Rows = slice(None)) -> np.ndarray:
        """Rows of `name` (a slice or sorted-or-not row numbers along axis 0), or a block.
        Raises DamagedData for rows never stored or stored bytes that fail to decode."""

    def missing_blocks(self, name: str) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of the N axis whose storage unit (Zarr shard file, HDF5
        chunk) was never written."""

    def checksummed(self, name: str) -> bool:
        """Whether every stored chunk of `name` carries a checksum that reads verify."""

    def shard_digests(
        self, name: str, shard_rows: int, shards: list[int] | None = None
    ) -> list[str | None]:
        """sha256 of the stored bytes of shards `shards` (default: every shard) of `name`,
        in that order (None: nothing stored)."""

    def shard_seals(self, name: str, shard_rows: int) -> list[str | None]:
        """Each shard's seal (None: nothing stored): sha256 of its chunk index and of every
        chunk's stored checksum, cheap to read back (no chunk is read whole). Reads check it
        once `pin_seals` gave the ones recorded at finish."""

    def pin_seals(self, seals: dict[str, list[str | None]], shard_rows: int) -> None:
        """From now on, refuse to read a shard whose seal is not `seals[node][k]`."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def has(self, name: str) -> bool: ...

    def attrs(self) -> dict[str, Any]: ...

    def set_attrs(self, values: dict[str, Any]) -> None: ...

    def replace_attrs(self, values: dict[str, Any]) -> None:
        """Make `values` the whole attribute dict (keys not in it are dropped)."""

    def close(self) -> None: ...


class _Guarded:
    """The read guard both backends share. A subclass gives `_read` (the library's read),
    `_unit` (rows per storage unit), `_stored_units` (which units exist, from one listing)
    and `_reason` (a decoding failure in words)."""

    path: Path
    missing_word = "missing"

    def __init__(self) -> None:
        # Per array, found once per open (not once per read): the storage units never written
        # (one listing), and (rows, rows per unit) along N.
        self._missing: dict[str, list[int]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        # Seals recorded at finish (node -> one per shard), and the shards whose seal was
        # checked, with the stamp (inode, size, mtime) of their storage at that time.
        self._seals: dict[str, list[str | None]] = {}
        self._seal_rows = 0
        self._sealed: dict[tuple[str, int], Any] = {}

    def pin_seals(self, seals: dict[str, list[str | None]], shard_rows: int) -> None:
        self._seals, self._seal_rows = dict(seals), shard_rows

    def _forget(self, name: str) -> None:
        """Drop what is known of array `name` (it was just created or written)."""
        self._missing.pop(name, None)
        self._sizes.pop(name, None)

    def read(self, name: str, rows: Rows = slice(None)) -> np.ndarray:
        axis = schema.get(name).axis
        index = _full_index(rows, axis)
        if missing := self._missing_units(name):
            units = self._units_of(name, index[axis], axis)
            if hit := [u for u in missing if u in units]:
                start, stop = self._unit_rows(name, hit[0], axis)
                raise DamagedData(self.path, name, start, stop, self.missing_word)
        try:
            shards = self._check_seals(name, index[axis], axis)
            values = self._read(name, rows)
            self._check_stamps(name, shards, axis)  # what was read is what was checked
            return values
        except _Unsealed as e:  # damage says so in the codec's words; else it is misplaced
            units = sorted(self._units_of(name, index[axis], axis))
            try:
                self._read(name, rows)
            except Exception as damage:
                raise self._locate(name, index, axis, units, damage) from None
            raise e.error from None
        except PipelineError:
            raise
        except Exception as e:  # a damaged chunk makes the codec raise whatever it raises
            units = sorted(self._units_of(name, index[axis], axis))
            raise self._locate(name, index, axis, units, e) from None

    def _locate(
        self, name: str, index: tuple, axis: int, units: list[int], error: Exception
    ) -> DamagedData:
        """The first damaged storage unit among `units`, read one at a time (failures only)."""
        for u in units:
            start, stop = self._unit_rows(name, u, axis)
            one = index[:axis] + (slice(start, stop),) + index[axis + 1 :]
            try:
                self._read(name, one)
            except Exception as e:
                return DamagedData(self.path, name, start, stop, self._reason(name, e))
        start, stop = self._unit_rows(name, units[0], axis) if units else (0, 0)
        last = self._unit_rows(name, units[-1], axis)[1] if units else 0
        return DamagedData(self.path, name, start, last, self._reason(name, error))

    def _check_seals(self, name: str, rows: Any, axis: int) -> list[int]:
        """Check the seal of each shard the N-axis selection `rows` touches, once per shard
        while its storage is unchanged; returns those shards."""
        if name not in self._seals:
            return []
        n, _ = self._rows_per_unit(name, axis)
        shards = sorted(_units(rows, n, self._seal_rows))
        recorded = self._seals[name]
        for k in shards:
            stamp = self._seal_stamp(name, k)
            if stamp is not None and self._sealed.get((name, k)) == stamp:
                continue
            if k < len(recorded) and recorded[k] is not None:
                if self.seal(name, k) != recorded[k]:
                    raise _Unsealed(self._not_here(name, k, axis))
            self._sealed[(name, k)] = stamp
        return shards

    def _check_stamps(self, name: str, shards: list[int], axis: int) -> None:
        for k in shards:
            if self._seal_stamp(name, k) != self._sealed.get((name, k)):
                raise self._not_here(name, k, axis, f"replaced while it was read (shard {k})")

    def _not_here(self, name: str, k: int, axis: int, what: str = "") -> DamagedData:
        n, _ = self._rows_per_unit(name, axis)
        start, stop = k * self._seal_rows, min((k + 1) * self._seal_rows, n)
        what = what or (
            f"not what was written at this place (shard {k}: its chunk index and checksums "
            "differ from the seal recorded at finish: a swapped, copied, foreign, emptied or "
            "replaced shard)"
        )
        return DamagedData(self.path, name, start, stop, what)

    def seal(self, name: str, k: int) -> str | None: ...

    def _seal_stamp(self, name: str, k: int) -> Any: ...

    def shard_seals(self, name: str, shard_rows: int) -> list[str | None]:
        axis = schema.get(name).axis
        count = math.ceil(self.shape(name)[axis] / shard_rows) if shard_rows else 0
        self._seal_rows = shard_rows
        return [self.seal(name, k) for k in range(count)]

    def _rows_per_unit(self, name: str, axis: int) -> tuple[int, int]:
        """(rows along N, rows per storage unit) of array `name`."""
        if name not in self._sizes:
            self._sizes[name] = (self.shape(name)[axis], self._unit(name, axis))
        return self._sizes[name]

    def _units_of(self, name: str, rows: Any, axis: int) -> set[int]:
        """Storage units holding the N-axis selection `rows` (a slice or row numbers)."""
        n, unit = self._rows_per_unit(name, axis)
        return _units(rows, n, unit)

    def _unit_rows(self, name: str, u: int, axis: int) -> tuple[int, int]:
        n, unit = self._rows_per_unit(name, axis)
        return u * unit, min((u + 1) * unit, n)

    def _missing_units(self, name: str) -> list[int]:
        if name not in self._missing:
            axis = schema.get(name).axis
            n, unit = self._rows_per_unit(name, axis)
            count = math.ceil(n / unit)
            stored = self._stored_units(name, axis)
            self._missing[name] = [u for u in range(count) if u not in stored]
        return self._missing[name]

    def missing_blocks(self, name: str) -> list[tuple[int, int]]:
        axis = schema.get(name).axis
        return [self._unit_rows(name, u, axis) for u in self._missing_units(name)]

    # Provided by each backend.
    def shape(self, name: str) -> tuple[int, ...]: ...

    def _read(self, name: str, rows: Rows) -> np.ndarray: ...

    def _unit(self, name: str, axis: int) -> int: ...

    def _stored_units(self, name: str, axis: int) -> set[int]: ...

    def _reason(self, name: str, error: Exception) -> str: ...


class _Unsealed(Exception):
    """A shard whose seal is not the one recorded: `error` says so, unless reading it shows
    plain damage (a checksum that fails), which is then said instead."""

    def __init__(self, error: DamagedData):
        super().__init__(str(error))
        self.error = error


def _units(rows: Any, n: int, unit: int) -> set[int]:
    """Blocks of `unit` rows (of `n`) holding the selection `rows` (a slice or row numbers)."""
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(n)
        return set(range(start // unit, math.ceil(stop / unit))) if stop > start else set()
    picked = np.asarray(rows).reshape(-1)
    if picked.dtype == bool:
        picked = np.flatnonzero(picked)
    return set((np.where(picked < 0, picked + n, picked) // unit).tolist())


def _full_index(rows: Rows, axis: int) -> tuple:
    """`rows` as an index with an entry for every axis up to the row axis: a bare selection
    applies to axis 0 (rows for N-first nodes, members for members/logits)."""
    index = rows if isinstance(rows, tuple) else (rows,)
    return index + (slice(None),) * (axis + 1 - len(index))


def _undecodable(error: Exception) -> str:
    return f"damaged (undecodable: {one_line(error, limit=100)})"


class ZarrBackend(_Guarded):
    """A Zarr v3 group in a directory; arrays sharded along N, zstd-compressed, and (format
    version 2) a crc32c checksum after the compressor on every chunk; the shard index carries
    zarr's own crc32c either way.

    zarr's local store writes every file to a temporary name and renames it, so a shard file or
    zarr.json is either whole or absent after a crash; `discard_unfinished_writes` sweeps the
    temporaries a killed process leaves behind.
    """

    name = "zarr"
    missing_word = "missing (no shard file)"

    def __init__(self, path: Location, mode: str, attrs: dict[str, Any] | None = None):
        import zarr

        super().__init__()
        self.path = store.location(path)
        # A URL (object storage): files are listed, read and written through fsspec.
        self._fs = store.filesystem(self.path) if isinstance(self.path, str) else None
        # `attrs` go into the group's first zarr.json, so the group never exists without them.
        self._group = zarr.open_group(
            str(self.path), mode=mode, zarr_format=3, attributes=attrs or None
        )
        # Opened arrays by name: zarr reads an array's zarr.json at every group lookup (~1 ms).
        self._arrays: dict[str, Any] = {}
        self._keys: dict[str, list[str]] = {}  # shard file keys by array

    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self._open_array(name)
        return self._arrays[name]

    def _open_array(self, name: str) -> Any:
        """The array `name` (KeyError when there is none); metadata zarr cannot parse (an
        unknown codec, a mistyped field) is this cache's damage, said in one line."""
        try:
            return self._group[name]
        except KeyError:
            raise
        except Exception as e:
            raise PipelineError(
                f"cache {self.path} is damaged: {name}/zarr.json: {one_line(e, limit=150)}"
            ) from None

    def create_array(self, name, shape, dtype, chunks, shards, compression, checksum=True):
        from zarr.codecs import Crc32cCodec, GzipCodec, ZstdCodec

        codec, level = compression
        # crc32c last: it covers the compressed bytes (zstd's frame header included) and is
        # checked before anything tries to decompress them.
        makers = {"zstd": lambda: ZstdCodec(level=level), "gzip": lambda: GzipCodec(level=level)}
        compressors = [makers[codec]()] if codec in makers else []
        if checksum:
            compressors.append(Crc32cCodec())
        self._group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressors or None,
            fill_value=0,
        )
        self._forget(name)
        self._arrays.pop(name, None)

    def write(self, name, offset, data):
        # Store every chunk, even one equal to the fill value: then a missing file always means
        # a missing shard, which `missing_blocks` can report.
        arr = self._array(name).with_config({"write_empty_chunks": True})
        arr[_block(offset, data)] = data
        self._forget(name)

    def _read(self, name, rows):
        arr = self._array(name)
        if isinstance(rows, (slice, tuple)):
            return arr[rows]
        return arr.get_orthogonal_selection((np.asarray(rows),))

    def _unit(self, name, axis):
        arr = self._array(name)
        return (arr.shards or arr.chunks)[axis]

    def _shard_keys(self, name: str, axis: int) -> list[str]:
        """Path of each shard file of `name` below its directory, in row order."""
        if name not in self._keys:
            self._keys[name] = self._make_shard_keys(name, axis)
        return self._keys[name]

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self._keys.pop(name, None)

    def _make_shard_keys(self, name: str, axis: int) -> list[str]:
        arr = self._array(name)
        count = math.ceil(arr.shape[axis] / self._unit(name, axis))
        keys = []
        for u in range(count):
            coords = [0] * arr.ndim
            coords[axis] = u
            keys.append(arr.metadata.encode_chunk_key(tuple(coords)))
        return keys

    def _stored_units(self, name, axis):
        if self._fs is not None:
            fs, root = self._fs
            base = f"{root}/{name}/"
            files = {k[len(base) :] for k in fs.find(base)}
        else:
            root = self.path / name
            files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        return {u for u, key in enumerate(self._shard_keys(name, axis)) if key in files}

    def _reason(self, name, error):
        if "checksum" in str(error).lower():  # zarr's crc32c codec: "... checksum do not match"
            return "damaged (checksum mismatch)"
        return _undecodable(error)

    def checksummed(self, name):
        from zarr.codecs import Crc32cCodec, ShardingCodec

        codecs = self._array(name).metadata.codecs
        inner = [c for s in codecs if isinstance(s, ShardingCodec) for c in s.codecs]
        return any(isinstance(c, Crc32cCodec) for c in [*codecs, *inner])

    def shard_digests(self, name, shard_rows, shards=None):
        axis = schema.get(name).axis
        if self._unit(name, axis) != shard_rows:
            raise ValueError(f"{name}: shards of {self._unit(name, axis)} rows, not {shard_rows}")
        keys = self._shard_keys(name, axis)
        picked = [f"{name}/{keys[k]}" for k in (range(len(keys)) if shards is None else shards)]
        # Reading and sha256 release the GIL: hash shard files on every core.
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(self._sha256, picked))

    def seal(self, name: str, k: int) -> str | None:
        """sha256 of shard k's index (the end of its file: an (offset, nbytes) pair per chunk
        and the index's crc32c) and of every chunk's last 4 bytes (its crc32c): a few small
        reads, however large the shard. None: no shard file; "" : too short to hold an index."""
        arr, axis = self._array(name), schema.get(name).axis
        key = f"{name}/{self._shard_keys(name, axis)[k]}"
        per_shard = zip(arr.shards or arr.chunks, arr.chunks, strict=True)
        tail = 16 * math.prod(s // c for s, c in per_shard) + 4
        try:
            size, read = self._ranged(key)
        except FileNotFoundError:
            return None
        if size < tail:
            return ""
        index = read([(size - tail, size)])[0]
        pairs = np.frombuffer(index[:-4], "<u8").reshape(-1, 2)
        stored = [(int(o), int(b)) for o, b in pairs if o != _EMPTY and b >= 4 and o + b <= size]
        if len(stored) != sum(1 for o, _ in pairs if o != _EMPTY):
            return ""  # an index pointing outside the file: not a shard of this array
        crcs = read([(o + b - 4, o + b) for o, b in stored])
        return hashlib.sha256(index + b"".join(crcs)).hexdigest()

    def _ranged(self, key: str) -> tuple[int, Any]:
        """(size of file `key`, a function reading byte ranges [(start, stop)] of it)."""
        if self._fs is None:
            path = self.path / key
            size = path.stat().st_size

            def read(ranges):
                with open(path, "rb") as f:
                    return [os.pread(f.fileno(), b - a, a) for a, b in ranges]

            return size, read
        fs, root = self._fs
        url = f"{root}/{key}"
        size = fs.size(url)
        return size, lambda ranges: fs.cat_ranges(
            [url] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges]
        )

    def _seal_stamp(self, name: str, k: int) -> Any:
        if self._fs is not None:
            return None  # object storage: checked once per open (no cheap stat)
        path = self.path / name / self._shard_keys(name, schema.get(name).axis)[k]
        try:
            st = path.stat()
        except OSError:
            return (-1, -1, -1)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _sha256(self, key: str) -> str | None:
        """sha256 of the stored file `key` (below the group), None if absent."""
        if self._fs is None:
            return _file_sha256(self.path / key)
        fs, root = self._fs
        try:
            return hashlib.sha256(fs.cat_file(f"{root}/{key}")).hexdigest()
        except FileNotFoundError:
            return None

    def shape(self, name):
        return tuple(self._array(name).shape)

    def dtype(self, name):
        return np.dtype(self._array(name).dtype)

    def has(self, name):
        try:
            self._array(name)
        except KeyError:
            return False
        return True

    def attrs(self):
        return dict(self._group.attrs)

    def set_attrs(self, values):
        self._group.attrs.update(values)

    def replace_attrs(self, values):
        self._group.attrs.put(values)

    def discard_unfinished_writes(self) -> None:
        """Remove the temporaries of writes a killed process never renamed into place (object
        stores write whole objects: none there)."""
        if self._fs is not None:
            return
        for p in self.path.rglob("*.partial"):
            if _ZARR_TEMPORARY.search(p.name) and p.is_file():
                p.unlink()

    # Shard records of a cache being written (`CacheWriter`): one small JSON file per finished
    # shard beside the arrays, so processes writing different shards never write one file.
    def write_record(self, k: int, doc: dict[str, Any]) -> None:
        """Record shard `k` as finished with `doc`, whole or not at all (temporary and rename;
        on object storage one PUT)."""
        if self._fs is not None:
            fs, root = self._fs
            fs.pipe_file(f"{root}/{RECORDS}/shard-{k}.json", json.dumps(doc).encode())
            return
        folder = self.path / RECORDS
        folder.mkdir(exist_ok=True)
        tmp = folder / f".shard-{k}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, folder / f"shard-{k}.json")

    def read_records(self) -> dict[int, dict[str, Any]]:
        """Shard -> its record, for every shard recorded (unreadable records are not)."""
        records = {}
        for key, read in self._record_files():
            try:
                k = int(key.rpartition("/")[2].removeprefix("shard-").removesuffix(".json"))
                doc = json.loads(read())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict):
                records[k] = doc
        return records

    def _record_files(self) -> list[tuple[str, Any]]:
        """(name, a function reading it) of every shard record file."""
        if self._fs is None:
            return [(p.name, p.read_bytes) for p in (self.path / RECORDS).glob("shard-*.json")]
        fs, root = self._fs
        keys = fs.glob(f"{root}/{RECORDS}/shard-*.json")
        return [(k, lambda k=k: fs.cat_file(k)) for k in keys]

    def drop_records(self) -> None:
        """Remove every shard record (the cache is finished, or started over)."""
        if self._fs is not None:
            fs, root = self._fs
            if fs.exists(f"{root}/{RECORDS}"):
                fs.rm(f"{root}/{RECORDS}", recursive=True)
            return
        folder = self.path / RECORDS
        if folder.is_dir():
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()

    def close(self):
        pass


RECORDS = "progress"  # folder of the shard records in a partial cache
_EMPTY = 2**64 - 1  # a shard index's offset and nbytes of a chunk never written

# zarr.storage.LocalStore writes `key` as `key-with-suffix-replaced.<uuid4 hex>.partial`.
_ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _block(offset: int | tuple[int, ...], data: np.ndarray) -> tuple[slice, ...]:
    offset = (offset,) if isinstance(offset, int) else tuple(offset)
    return tuple(slice(o, o + n) for o, n in zip(offset, data.shape, strict=False))


FORMATS = ("zarr", "hdf5")


def _backend_class(fmt: str) -> type[Backend]:
    if fmt == "hdf5":
        from pipeline.cache.hdf5 import HDF5Backend  # h5py: only for HDF5 caches

        return HDF5Backend
    return ZarrBackend


def format_for_path(path: str | Path, requested: str = "auto") -> str:
    """The backend for an output path: explicit, else by suffix (.h5/.hdf5 → hdf5, else zarr).
    A URL (object storage) takes Zarr only."""
    fmt = requested
    by_suffix = "hdf5" if Path(str(path)).suffix.lower() in (".h5", ".hdf5") else "zarr"
    if requested == "auto":
        fmt = by_suffix
    elif requested not in FORMATS:
        raise PipelineError(f"--format {requested!r}: expected zarr or hdf5")
    elif requested != by_suffix and Path(str(path)).suffix.lower() in (".h5", ".hdf5", ".zarr"):
        named = {"hdf5": "an HDF5", "zarr": "a Zarr"}[by_suffix]
        raise PipelineError(f"{path} is named as {named} cache but --format is {requested}")
    if fmt == "hdf5" and store.is_url(store.location(path)):
        raise PipelineError(
            f"{path}: HDF5 caches are local files only; write a Zarr cache to a URL "
            "(e.g. s3://bucket/teacher.zarr), or HDF5 to a local path"
        )
    return fmt


def detect_format(path: Location) -> str:
    """Which backend wrote an existing cache at `path` (a URL: Zarr, if it holds one)."""
    if isinstance(path, str):
        if store.read_meta(path) is None:
            if store.exists(path):
                raise PipelineError(f"{path}: not a Zarr v3 group (no readable zarr.json)")
            raise PipelineError(f"cache not found: {path}")
        return "zarr"
    if path.is_dir():
        if (path / "zarr.json").is_file():
            return "zarr"
        raise PipelineError(f"{path}: a directory but not a Zarr v3 group (no zarr.json)")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(8) == HDF5_SIGNATURE:
                return "hdf5"
        raise PipelineError(f"{path}: neither a Zarr directory nor an HDF5 file")
    raise PipelineError(f"cache not found: {path}{_siblings(path)}")


def _siblings(path: Path) -> str:
    """", but X is there" when a cache of the same name in the other format is beside `path`
    (caches/test.zarr asked for, caches/test.h5 written)."""
    stem = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    others = [path.with_name(stem + s) for s in (".zarr", ".h5", ".hdf5")]
    found = [str(p) for p in others if p != path and p.exists()]
    return f" (but {' and '.join(found)} is there)" if found else ""


def open_backend(path: str | Path, mode: str, fmt: str | None = None) -> Backend:
    path = store.location(path)
    fmt = fmt or detect_format(path)
    if fmt == "hdf5" and isinstance(path, str):
        format_for_path(path, "hdf5")  # refused: HDF5 is local only
    if isinstance(path, str):  # object storage: its failures are one line naming the URL
        return store.guarded(path, lambda: _backend_class(fmt)(path, mode))
    try:
        return _backend_class(fmt)(path, mode)
    except PipelineError:
        raise
    except OSError as e:
        raise PipelineError(f"{path}: cannot open as {fmt} ({one_line(e, limit=150)})") from None
    except Exception as e:  # metadata the library cannot parse (not JSON, a list, ...)
        raise PipelineError(
            f"cache {path} is damaged: its {fmt} metadata cannot be read ({one_line(e, limit=150)})"
        ) from None
