"""Whole-cache copies: every node's stored words and every attribute of a finished cache into
a new one (`convert-cache`, and the HDF5 writer, which builds a Zarr partial and converts it
once complete), and the per-shard digests every finished cache records."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import layout, schema, store
from pipeline.cache.backends import Backend, open_backend


def create_array(
    backend: Backend,
    node: schema.Node,
    shape: tuple[int, ...],
    word: np.dtype,
    compression: tuple[str, int],
    chunk_rows: int,
    shard_rows: int,
    checksum: bool = True,
) -> None:
    """Create the array of `node`, chunked and sharded along its row axis, with a checksum on
    every chunk unless `checksum` is False (format version 1)."""
    chunks, shards = layout.chunking(shape, node.axis, chunk_rows, shard_rows)
    backend.create_array(node.name, shape, word, chunks, shards, compression, checksum)


def copy_cache(
    src: Backend,
    dst: str | Path,
    fmt: str,
    checksums: bool = True,
    compression: str | None = None,
) -> store.Location:
    """Copy every node of the table (stored words, unchanged) and every attribute of the
    finished cache `src` into a new cache at `dst` in `fmt`, block by block; `complete` is set
    last. The copy is written in the current format (checksums, and shard digests of its own
    stored bytes) whatever the version of `src`; `checksums=False` writes version 1.
    `compression`: recompress with it (recorded); None keeps the source's."""
    attrs = src.attrs()
    for key in (layout.PROGRESS, "complete", layout.DIGESTS, layout.ATTRS_DIGEST):
        attrs.pop(key, None)
    if compression is not None:
        attrs["compression"] = layout.compression_for(compression, fmt)
    comp = layout.parse_compression(attrs["compression"])
    chunk_rows, shard_rows = int(attrs["chunk_rows"]), int(attrs["shard_rows"])
    out = open_backend(dst, "w", fmt)
    try:
        for node in schema.nodes(attrs):
            if not src.has(node.name):
                continue
            shape, axis = src.shape(node.name), node.axis
            word = src.dtype(node.name)
            create_array(out, node, shape, word, comp, chunk_rows, shard_rows, checksums)
            for rows in layout.shard_ranges(shape[axis], shard_rows):
                block = src.read(node.name, node.index(rows))  # checked: damage is an error
                out.write(node.name, (0,) * axis + (rows.start,), block)
        attrs["format_version"] = layout.FORMAT_VERSION if checksums else 1
        if checksums:
            attrs[layout.DIGESTS] = shard_digests(out, shard_rows, attrs=attrs)
            attrs[layout.ATTRS_DIGEST] = layout.attrs_digest(attrs)
        out.set_attrs({**attrs, "complete": False})
        out.set_attrs({"complete": True})
    finally:
        out.close()
    return store.location(dst)


# What each backend's digests are taken over (recorded with them, so a reader knows).
DIGESTS_OF = {"zarr": "shard file", "hdf5": "stored chunks of the shard, in chunk order"}


def shard_digests(
    backend: Backend,
    shard_rows: int,
    known: Mapping[str, Mapping[int, str | None]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `layout.DIGESTS` attribute: sha256 of each shard of every node `backend` holds, as
    stored (Zarr: the shard file; HDF5: the shard's chunks as on disk). `known` digests
    (node -> shard -> digest, taken as the shards were written) are not taken again. `attrs`:
    the cache's attributes, for the nodes it declares (default: the backend's)."""
    digests, seals = {}, {}
    for node in schema.nodes(backend.attrs() if attrs is None else attrs):
        if not backend.has(node.name):
            continue
        have = dict((known or {}).get(node.name, {}))
        count = layout.num_shards(backend.shape(node.name)[node.axis], shard_rows)
        todo = [k for k in range(count) if k not in have]
        have.update(zip(todo, backend.shard_digests(node.name, shard_rows, todo), strict=True))
        digests[node.name] = [have[k] for k in range(count)]
        seals[node.name] = backend.shard_seals(node.name, shard_rows)
    return {
        "algorithm": "sha256",
        "of": DIGESTS_OF[backend.name],
        "shard_rows": shard_rows,
        "nodes": digests,
        # Checked by every read (`Backend.seal`): the chunk index and chunk checksums of each
        # shard, so a shard read at one place is the shard written there.
        "seals": seals,
    }
