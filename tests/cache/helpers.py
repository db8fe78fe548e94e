"""Byte-level views of caches for comparisons, and teachers built to misbehave."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.cache import layout
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint

# Attributes that legitimately differ between two runs of the same command: none since the
# time of creation moved to the run record (caches of earlier versions held `created_at`).
VOLATILE = ("created_at",)


def zarr_files(path: Path, root: bool = True) -> dict[str, bytes]:
    """Every file of a Zarr cache as bytes: the root zarr.json with its attributes too, unless
    `root` is False (a converted copy writes the same attributes in another order)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and (root or p != path / "zarr.json")
    }


def hdf5_chunks(path: Path) -> dict[str, object]:
    """Every dataset of an HDF5 cache: shape, dtype, filters, and each stored chunk's raw
    (compressed) bytes."""
    import h5py
    import hdf5plugin  # noqa: F401

    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        for name in sorted(names):
            ds = f[name]
            chunks = []
            for i in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(i)
                chunks.append((info.chunk_offset, ds.id.read_direct_chunk(info.chunk_offset)))
            out[name] = (
                ds.shape,
                str(ds.dtype),
                ds.chunks,
                ds.compression_opts,
                dict(ds._filters),
                chunks,
            )
    return out


def stable_attrs(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in VOLATILE}


def portable_attrs(attrs: dict) -> dict:
    """The attributes a conversion keeps: all but the shard digests, which are taken over each
    format's own stored bytes (and the attribute digest, which covers them), and the
    compression, which by default becomes the target format's own (gzip for HDF5, so it opens
    without plugins)."""
    dropped = (layout.DIGESTS, layout.ATTRS_DIGEST, "compression")
    return {k: v for k, v in attrs.items() if k not in dropped}


def mlp_checkpoint(
    path: Path, num_classes: int = 10, class_names=None, mutate=None, seed=0
) -> Path:
    """A tiny digits MLP checkpoint; `mutate(model)` may edit its weights first."""
    torch.manual_seed(seed)
    model = create_model("mlp", num_classes, (1, 8, 8), hidden=[8])
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    meta = {
        "model": "mlp",
        "model_kwargs": {"hidden": [8]},
        "num_classes": num_classes,
        "input_shape": [1, 8, 8],
        "class_names": class_names,
    }
    save_checkpoint(path, model, meta)
    return path


def overflow_on_pixel(pixel: int):
    """A mutation making the MLP's logits ±Inf for exactly the inputs where `pixel` > ~0.1."""

    def mutate(model) -> None:
        first, last = model[1], model[3]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, pixel] = 3e38  # hidden unit 0 = 3e38 · x[pixel], still finite
        last.weight[:, 0] = 10.0  # × 10 overflows wherever x[pixel] > 0.11

    return mutate


def ctrl_c_at_forward(monkeypatch, call: int) -> Callable:
    """Make precompute's `call`-th shard forward raise KeyboardInterrupt (Ctrl-C while that
    shard is computed); returns the real `_forward`, to put back for the resume."""
    from pipeline.teacher import shards

    forward, calls = shards._forward, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return forward(*a, **kw)

    monkeypatch.setattr(shards, "_forward", interrupted)
    return forward


def reseal(path) -> None:
    """Record the cache's present shards as the ones written (digests, seals, attributes)."""
    from pipeline.cache import layout
    from pipeline.cache.backends import open_backend
    from pipeline.cache.copy import shard_digests

    backend = open_backend(path, "r+")
    attrs = backend.attrs()
    attrs[layout.DIGESTS] = shard_digests(backend, int(attrs["shard_rows"]), attrs=attrs)
    attrs[layout.ATTRS_DIGEST] = layout.attrs_digest(attrs)
    backend.replace_attrs(attrs)
    backend.close()
