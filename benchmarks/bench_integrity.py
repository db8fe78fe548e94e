"""What the integrity checks cost: write and read-all throughput with and without checksums.

"With" is the current format (version 2): a crc32c after zstd on every Zarr chunk, the
fletcher32 filter on every HDF5 chunk, and the sha256 and seal of every shard taken at finish,
each seal checked by every read (`seal_cost`: a read by shard with the checks against one
without them). "Without"
is format version 1 (zstd alone, no digests), written by the same writer. Both are read by the
same reader (its guard against missing shards runs for both).

Logits are Gaussian float32 (nearly incompressible: the worst case for a checksum's share of
the time) for C = 10 and C = 1000, about 128 MB each. A write is `CacheWriter.add` of every
row plus `finish` (ids and labels included, as precompute writes them); a read is opening the
cache and reading all logits either in one call ("read all") or shard by shard as training
does ("read by shard"). Variants alternate within each repeat; the best of the repeats is
reported (the run least disturbed by other load on a shared machine), as wall time and as
process CPU time (every thread: zarr decodes on a thread pool), the steadier of the two when
other jobs share the cores.

    python benchmarks/bench_integrity.py            # full run (a few minutes)
    python benchmarks/bench_integrity.py --quick    # smoke run (seconds)

Prints a table and saves JSON (default benchmarks/results/integrity.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.cache import CacheWriter, layout, open_cache  # noqa: E402

VARIANTS = {"without": 1, "with": layout.FORMAT_VERSION}  # name -> format_version
SUFFIXES = {"zarr": ".zarr", "hdf5": ".h5"}
OPS = {"write": "write", "read_all": "read all", "read_by_shard": "read by shard"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Small sizes, one repeat: a smoke run.")
    ap.add_argument("--mb", type=float, default=128.0, help="Logits per case, in MB.")
    ap.add_argument("--repeats", type=int, default=None, help="Alternating timed repeats.")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/integrity.json", help="JSON."
    )
    args = ap.parse_args()
    mb = 4.0 if args.quick else args.mb
    repeats = args.repeats or (1 if args.quick else 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in (10, 1000):
            n = int(mb * 1e6 / (4 * c))
            logits = (np.random.default_rng(c).standard_normal((n, 1, c)) * 3).astype(np.float32)
            for backend in SUFFIXES:
                rows.append(measure(Path(tmp), backend, logits, repeats))
    print_table(rows)
    result = {"machine": machine(), "quick": args.quick, "repeats": repeats, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {args.out}")


def machine() -> dict:
    import h5py
    import zarr

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "zarr": zarr.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn(*args, **kwargs)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def write(path: Path, logits: np.ndarray, format_version: int) -> None:
    """Write `logits` (N, 1, C) as a cache with the default layout."""
    n = len(logits)
    with CacheWriter(
        path,
        sample_ids=np.arange(n),
        labels=np.full(n, -1),
        num_classes=logits.shape[-1],
        format_version=format_version,
    ) as writer:
        writer.add({"logits": logits})
        writer.finish({})


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def read(path: Path, by_shard: bool, seals: bool = True) -> None:
    """Open the cache and read every logit, in one call or shard by shard; `seals` False
    reads without checking each shard's seal (to measure what the seals cost)."""
    with open_cache(path) as cache:
        if not seals:
            cache.backend.pin_seals({}, 1)
        if by_shard:
            for rows in layout.shard_ranges(cache.num_samples, int(cache.attrs["shard_rows"])):
                cache.logits(rows)
        else:
            cache.logits()


def measure(tmp: Path, backend: str, logits: np.ndarray, repeats: int) -> dict:
    """Best-of-`repeats` times of each variant, alternating variants within a repeat."""
    paths = {v: tmp / f"{v}{SUFFIXES[backend]}" for v in VARIANTS}
    times: dict[str, dict[str, list[tuple[float, float]]]] = {
        v: {op: [] for op in OPS} for v in VARIANTS
    }
    unsealed: list[tuple[float, float]] = []  # "with", read by shard without the seal checks
    for _ in range(repeats):
        for v, version in VARIANTS.items():
            remove(paths[v])
            times[v]["write"].append(timed(write, paths[v], logits, version))
        for v in VARIANTS:
            times[v]["read_all"].append(timed(read, paths[v], by_shard=False))
            times[v]["read_by_shard"].append(timed(read, paths[v], by_shard=True))
        unsealed.append(timed(read, paths["with"], by_shard=True, seals=False))
    with open_cache(paths["with"]) as cache:
        assert cache.checksums and cache.backend.checksummed("logits")
        np.testing.assert_array_equal(cache.logits(slice(0, 100)), logits[:100])
    mb = logits.nbytes / 1e6
    row = {
        "backend": backend,
        "classes": logits.shape[-1],
        "samples": len(logits),
        "logits_mb": mb,
        "size_bytes": {v: disk_bytes(p) for v, p in paths.items()},
        "seconds": times,
    }
    for op in OPS:
        wall = {v: min(w for w, _ in times[v][op]) for v in VARIANTS}
        cpu = {v: min(c for _, c in times[v][op]) for v in VARIANTS}
        row[f"{op}_mb_per_s"] = {v: mb / wall[v] for v in VARIANTS}
        row[f"{op}_cost"] = wall["with"] / wall["without"] - 1  # extra wall time, fraction
        row[f"{op}_cpu_s"] = cpu
        row[f"{op}_cpu_cost"] = cpu["with"] / cpu["without"] - 1  # extra CPU time, fraction
    # What the per-read seal checks (a shard read is the shard written there) add to a read.
    sealed = min(w for w, _ in times["with"]["read_by_shard"])
    row["seal_cost"] = sealed / min(w for w, _ in unsealed) - 1
    return row


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def print_table(rows: list[dict]) -> None:
    print("\nChecksum cost (float32 Gaussian logits, zstd:3, default layout; best of repeats)")
    print("MB/s without / with checksums, then the extra wall time and the extra CPU time")
    print(
        f"{'backend':<8}{'C':>6}{'N':>10}{'MB':>6}  "
        + "".join(f"{title:>15}{'wall':>7}{'CPU':>7}  " for title in OPS.values())
        + f"{'seals':>7}"
    )
    for r in rows:
        cells = ""
        for op in OPS:
            speed, wall, cpu = r[f"{op}_mb_per_s"], r[f"{op}_cost"], r[f"{op}_cpu_cost"]
            cells += f"{speed['without']:>7.0f}/{speed['with']:<7.0f}{wall:>+7.1%}{cpu:>+7.1%}  "
        case = f"{r['backend']:<8}{r['classes']:>6}{r['samples']:>10}{r['logits_mb']:>6.0f}"
        print(f"{case}  {cells}{r['seal_cost']:>+7.1%}")


if __name__ == "__main__":
    main()
