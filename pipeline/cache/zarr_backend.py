"""The Zarr v3 backend: a group in a directory (or at an fsspec URL), arrays sharded along N,
zstd-compressed, with a crc32c after the compressor on every chunk (format version 2); the
shard records of a partial cache; each shard's seal. The interface and the read guard are
`pipeline.cache.backends`'."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import schema, store
from pipeline.cache.backends import _block, _Guarded, _undecodable
from pipeline.cache.store import Location
from pipeline.core.errors import PipelineError, one_line


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

    def seal(self, name: str, k: int, shard_rows: int) -> str | None:
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
        pairs = np.frombuffer(index[:-4], "<u8").reshape(-1, 2).tolist()  # Python ints: no wrap
        stored = [(o, b) for o, b in pairs if o != _EMPTY and b >= 4 and o + b <= size]
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
        self._write_json(f"shard-{k}.json", doc)

    def write_finished(self, run: str) -> None:
        """Record that the partial cache on object storage is whole, written by the run of
        digest `run`: a publish killed half-way is then finished by that run, not redone."""
        self._write_json(FINISHED, {"run": run})

    def read_finished(self) -> str | None:
        """The digest `write_finished` recorded; None if none."""
        try:
            if self._fs is None:
                text = (self.path / RECORDS / FINISHED).read_text()
            else:
                fs, root = self._fs
                text = fs.cat_file(f"{root}/{RECORDS}/{FINISHED}").decode()
            run = json.loads(text).get("run")
        except (OSError, ValueError, AttributeError):
            return None
        return run if isinstance(run, str) else None

    def _write_json(self, name: str, doc: dict[str, Any]) -> None:
        if self._fs is not None:
            fs, root = self._fs
            fs.pipe_file(f"{root}/{RECORDS}/{name}", json.dumps(doc).encode())
            return
        folder = self.path / RECORDS
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, folder / name)

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


RECORDS = store.RECORDS  # folder of the shard records in a partial cache
FINISHED = "finished.json"  # in RECORDS: a whole partial cache on object storage
_EMPTY = 2**64 - 1  # a shard index's offset and nbytes of a chunk never written

# zarr.storage.LocalStore writes `key` as `key-with-suffix-replaced.<uuid4 hex>.partial`.
_ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()
