"""Two thin storage backends behind one interface: named arrays plus a JSON attribute dict.

Everything about *what* is stored lives in `schema.py`, `layout.py` and the writer/reader; a
backend only knows how to create, write and read a named chunked array in its format.

Every read is guarded the same way in both formats (`_Guarded.read`): rows whose storage unit
(Zarr shard file, HDF5 chunk) was never written are refused instead of reading as the fill
value, and a chunk that fails its checksum or does not decode is reported as `DamagedData`,
one line naming the cache, the node and the rows, never as a library traceback.
"""

from __future__ import annotations

import math
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
                if self.seal(name, k, self._seal_rows) != recorded[k]:
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

    def seal(self, name: str, k: int, shard_rows: int) -> str | None: ...

    def _seal_stamp(self, name: str, k: int) -> Any: ...

    def shard_seals(self, name: str, shard_rows: int) -> list[str | None]:
        axis = schema.get(name).axis
        count = math.ceil(self.shape(name)[axis] / shard_rows) if shard_rows else 0
        return [self.seal(name, k, shard_rows) for k in range(count)]

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


def _block(offset: int | tuple[int, ...], data: np.ndarray) -> tuple[slice, ...]:
    offset = (offset,) if isinstance(offset, int) else tuple(offset)
    return tuple(slice(o, o + n) for o, n in zip(offset, data.shape, strict=False))


FORMATS = ("zarr", "hdf5")


def _backend_class(fmt: str) -> type[Backend]:
    if fmt == "hdf5":
        from pipeline.cache.hdf5 import HDF5Backend  # h5py: only for HDF5 caches

        return HDF5Backend
    from pipeline.cache.zarr_backend import ZarrBackend

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
    """ ", but X is there" when a cache of the same name in the other format is beside `path`
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
