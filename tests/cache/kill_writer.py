"""A child process of tests/cache/test_kill_points.py: writes a small cache, or a student-like
directory, the way the stages do, so a test hook can SIGKILL it at any step of the finish.

    python -m tests.cache.kill_writer cache OUT SEED [--overwrite] [--format hdf5]
    python -m tests.cache.kill_writer dir OUT SEED [--overwrite]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.cache.schema import LOGITS
from pipeline.cache.writer import CacheWriter
from pipeline.core.fsutil import OutputLock, atomic_output


def write_cache(out: str, seed: int, overwrite: bool, fmt: str = "auto") -> str:
    """A 48-row cache of seed `seed`'s logits; says when a killed run's cache was published."""
    logits = np.random.default_rng(seed).normal(size=(48, 1, 5)).astype(np.float32)
    writer = CacheWriter(
        out, sample_ids=np.arange(48) * 3, labels=np.arange(48) % 5, num_classes=5,
        chunk_rows=8, chunks_per_shard=2, fmt=fmt, overwrite=overwrite, run={"seed": seed},
    )  # fmt: skip
    if writer.finished:
        return "published"
    with writer:
        if not writer.shards_done:  # a killed run's converted-to-be shards are all there
            writer.add({LOGITS: logits[:20]})
            writer.add({LOGITS: logits[20:]})
        writer.finish({"class_names": None, "seed": seed})
    return "written"


def write_dir(out: Path, seed: int, overwrite: bool) -> str:
    """A directory written as train-student writes a student: under the output's lock, with
    a training log and a resume checkpoint beside it that go once it is in place."""
    live, resume = out.with_name(out.name + ".dvclive"), out.with_name(out.name + ".resume.pt")
    with OutputLock(out):
        live.mkdir(exist_ok=True)
        (live / "metrics.json").write_text(f"{seed}\n")
        with atomic_output(resume, overwrite=True) as tmp:
            tmp.write_text(f"epoch of {seed}\n")
        with atomic_output(out, overwrite, then=(live, resume)) as tmp:
            tmp.mkdir()
            (tmp / "weights.bin").write_bytes(bytes([seed]) * 64)
            (tmp / "info.json").write_text(f'{{"seed": {seed}}}\n')
    return "written"


if __name__ == "__main__":
    kind, out, seed, *flags = sys.argv[1:]
    overwrite = "--overwrite" in flags
    fmt = flags[flags.index("--format") + 1] if "--format" in flags else "auto"
    if kind == "cache":
        print(write_cache(out, int(seed), overwrite, fmt))
    else:
        print(write_dir(Path(out), int(seed), overwrite))
