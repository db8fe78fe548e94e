"""Stage-one benchmarks on CPU: what caching costs on top of the teacher, and what it stores.

1. Throughput: `precompute-logits` end to end (data load, teacher load, probe, fingerprint,
   writes, finish) with a CIFAR ResNet-56 on synthetic 32x32 inputs, divided by the raw
   teacher inference throughput on the same batches (forward calls only, inputs already
   tensors). Runs alternate raw / Zarr / HDF5. Three ratios: of the best wall times (the runs
   least disturbed by other load on a shared machine), the median of the per-repeat wall
   ratios, and of the median process CPU times (every thread, the background writer's too).
2. Bytes per sample of the stored logits for every dtype and compression: the ResNet-56's
   logits (random init: nearly the same for every input, so they compress unrealistically
   well) and a CNN briefly trained on digits (real, peaked logits).
3. The chunk / shard sweep behind the defaults: write and read-all time, size and file count
   against rows per chunk and chunks per shard, on Gaussian logits for 10 and 1000 classes.

    python benchmarks/bench_precompute.py            # full run: the README's figures
    python benchmarks/bench_precompute.py --quick    # smoke run (seconds)
    python benchmarks/bench_precompute.py --only throughput   # re-time, keep the rest

Prints tables and saves everything as JSON (default benchmarks/results/precompute.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.cache import CacheWriter, open_cache  # noqa: E402
from pipeline.core.config import PrecomputeConfig, TrainTeacherConfig  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from stages import precompute_logits, train_teacher  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
COMPRESSIONS = ("none", "zstd:1", "zstd:3", "zstd:9", "zstd:19")


SECTIONS = ("throughput", "bytes", "layout")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="Small sizes, one repeat: a smoke run.")
    ap.add_argument("--samples", type=int, default=None, help="Transfer-set size (throughput).")
    ap.add_argument("--batch-size", type=int, default=256, help="Teacher batch size.")
    ap.add_argument("--repeats", type=int, default=None, help="Alternating timed repeats.")
    ap.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="Run only this section (repeatable); the others are kept from an existing --out.",
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/precompute.json", help="JSON."
    )
    args = ap.parse_args()
    n = args.samples or (512 if args.quick else 4096)
    repeats = args.repeats or (1 if args.quick else 7)
    sections = args.only or SECTIONS
    result = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    result.update(machine=machine(), quick=args.quick)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, ckpt = synthetic_teacher(tmp, n)
        if "throughput" in sections:
            result["throughput"] = throughput(tmp, data, ckpt, n, args.batch_size, repeats)
        if "bytes" in sections:
            cfg = PrecomputeConfig(batch_size=args.batch_size, device="cpu")
            resnet = precompute_logits.run(cfg, [str(ckpt)], f"npz:{data}", tmp / "r.zarr")
            logits = {
                "resnet56_random_init": read_logits(resnet),
                "digits_cnn_trained": trained_digits_logits(tmp, epochs=2 if args.quick else 10),
            }
            result["bytes_per_sample"] = bytes_per_sample(tmp, logits)
        if "layout" in sections:
            result["layout"] = layout_sweep(tmp, quick=args.quick)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {args.out}")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# --- 1. throughput ------------------------------------------------------------------------


def synthetic_teacher(tmp: Path, n: int) -> tuple[Path, Path]:
    """An .npz of `n` Gaussian 32x32 RGB inputs and a seeded random-init ResNet-56 checkpoint."""
    rng = np.random.default_rng(0)
    data = tmp / "synthetic32.npz"
    np.savez(
        data,
        x=rng.standard_normal((n, 3, 32, 32), dtype=np.float32),
        y=rng.integers(0, 10, n),
        ids=np.arange(n),
    )
    ckpt = tmp / "resnet56.pt"
    model = create_model("resnet56", 10, (3, 32, 32))
    meta = {"model": "resnet56", "model_kwargs": {}, "num_classes": 10, "input_shape": [3, 32, 32]}
    save_checkpoint(ckpt, model, meta)
    return data, ckpt


def throughput(tmp: Path, data: Path, ckpt: Path, n: int, batch_size: int, repeats: int) -> dict:
    teacher, _ = load_checkpoint(ckpt)
    x = np.load(data)["x"]
    batches = [torch.from_numpy(x[s : s + batch_size]) for s in range(0, n, batch_size)]
    cfg = PrecomputeConfig(batch_size=batch_size, device="cpu")

    # Wall and process CPU time (all threads) per run. On a shared machine wall time swings
    # with other load; CPU time barely does, and it counts the background writer's work too.
    wall: dict[str, list[float]] = {"raw": [], "zarr": [], "hdf5": []}
    cpu: dict[str, list[float]] = {"raw": [], "zarr": [], "hdf5": []}

    def timed(kind: str, fn) -> None:
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall[kind].append(time.perf_counter() - w)
        cpu[kind].append(time.process_time() - c)

    def raw_inference() -> None:
        with torch.inference_mode():
            for xb in batches:
                teacher(xb)

    # Warm-up, untimed: first-call allocations and the zarr/h5py imports are nobody's throughput.
    raw_inference()
    small = tmp / "warmup.npz"
    np.savez(small, x=x[:batch_size], ids=np.arange(min(n, batch_size)))
    for suffix in (".zarr", ".h5"):
        precompute_logits.run(cfg, [str(ckpt)], f"npz:{small}", tmp / f"warmup{suffix}")
    for r in range(repeats):
        timed("raw", raw_inference)
        for fmt, suffix in (("zarr", ".zarr"), ("hdf5", ".h5")):
            out = tmp / f"{fmt}-{r}{suffix}"
            timed(fmt, lambda out=out: precompute_logits.run(cfg, [str(ckpt)], f"npz:{data}", out))
        print(
            f"repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {wall[k][-1]:.2f} s (cpu {cpu[k][-1]:.2f} s)" for k in wall),
            flush=True,
        )

    raw = n / min(wall["raw"])
    rows = {"raw": {"samples_per_s": raw, "wall_s": wall["raw"], "cpu_s": cpu["raw"]}}
    for fmt in ("zarr", "hdf5"):
        rate = n / min(wall[fmt])
        rows[fmt] = {
            "samples_per_s": rate,
            "ratio_to_raw": rate / raw,
            "median_ratio_per_repeat": statistics.median(
                [a / b for a, b in zip(wall["raw"], wall[fmt], strict=True)]
            ),
            "cpu_ratio_to_raw": statistics.median(cpu["raw"]) / statistics.median(cpu[fmt]),
            "wall_s": wall[fmt],
            "cpu_s": cpu[fmt],
        }
    print(f"\nThroughput: ResNet-56 on {n} synthetic 32x32 inputs, batch {batch_size}, CPU")
    print("ratio = precompute throughput / raw inference throughput")
    print(
        f"{'run':<26}{'samples/s':>10}{'ratio (best wall)':>19}{'(median wall)':>15}"
        f"{'(median cpu)':>14}"
    )
    print(f"{'raw teacher inference':<26}{raw:>10.1f}{1.0:>19.3f}{1.0:>15.3f}{1.0:>14.3f}")
    for fmt in ("zarr", "hdf5"):
        row = rows[fmt]
        print(
            f"{'precompute-logits ' + fmt:<26}{row['samples_per_s']:>10.1f}"
            f"{row['ratio_to_raw']:>19.3f}{row['median_ratio_per_repeat']:>15.3f}"
            f"{row['cpu_ratio_to_raw']:>14.3f}"
        )
    return {"model": "resnet56", "samples": n, "batch_size": batch_size, "repeats": repeats, **rows}


# --- 2. bytes per sample ------------------------------------------------------------------


def read_logits(cache: Path) -> np.ndarray:
    with open_cache(cache) as c:
        return c.logits()  # (N, 1, C)


def trained_digits_logits(tmp: Path, epochs: int) -> np.ndarray:
    cfg = TrainTeacherConfig(model="cnn", epochs=epochs, seed=0, device="cpu")
    ckpt = train_teacher.run(cfg, "digits:train", tmp / "digits_cnn.pt")
    out = precompute_logits.run(
        PrecomputeConfig(device="cpu"), [str(ckpt)], "digits:train", tmp / "d.zarr"
    )
    return read_logits(out)


def write_cache(path: Path, logits: np.ndarray, **kwargs) -> float:
    """Write `logits` (N, V, C) as a cache; returns the seconds it took."""
    start = time.perf_counter()
    n = len(logits)
    writer = CacheWriter(
        path, sample_ids=np.arange(n), labels=np.full(n, -1), num_classes=logits.shape[-1], **kwargs
    )
    with writer:
        writer.add({"logits": logits})
        writer.finish({})
    return time.perf_counter() - start


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bytes_per_sample(tmp: Path, sets: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for name, logits in sets.items():
        n, c = len(logits), logits.shape[-1]
        for dtype in DTYPES:
            for comp in COMPRESSIONS:
                z, h = tmp / "b.zarr", tmp / "b.h5"
                write_cache(z, logits, dtype=dtype, compression=comp, overwrite=True)
                write_cache(h, logits, dtype=dtype, compression=comp, overwrite=True)
                rows.append(
                    {
                        "logits": name,
                        "samples": n,
                        "classes": c,
                        "dtype": dtype,
                        "compression": comp,
                        "zarr_logits_bytes_per_sample": disk_bytes(z / "logits") / n,
                        "zarr_cache_bytes_per_sample": disk_bytes(z) / n,
                        "hdf5_cache_bytes_per_sample": disk_bytes(h) / n,
                    }
                )
    print("\nBytes per sample (logits array in Zarr; whole cache with ids and labels in both)")
    print(f"{'logits':<22}{'dtype':<10}{'compression':<13}{'logits':>8}{'zarr':>8}{'hdf5':>8}")
    for r in rows:
        print(
            f"{r['logits']:<22}{r['dtype']:<10}{r['compression']:<13}"
            f"{r['zarr_logits_bytes_per_sample']:>8.1f}{r['zarr_cache_bytes_per_sample']:>8.1f}"
            f"{r['hdf5_cache_bytes_per_sample']:>8.1f}"
        )
    return rows


# --- 3. chunk / shard sweep ---------------------------------------------------------------


def read_all_seconds(path: Path) -> float:
    start = time.perf_counter()
    with open_cache(path) as cache:
        cache.logits()
    return time.perf_counter() - start


def layout_sweep(tmp: Path, quick: bool) -> list[dict]:
    rng = np.random.default_rng(1)
    scale = 16 if quick else 1
    cases = [(10, 262144 // scale), (100, 32768 // scale), (1000, 8192 // scale)]
    chunk_rows = (256, 1024, 4096, 16384, 65536)
    rows = []
    for c, n in cases:
        logits = (rng.standard_normal((n, 1, c), dtype=np.float32) * 3).astype(np.float32)
        # (0, 0) is the default layout; then rows per chunk at 16 chunks per shard; then
        # chunks per shard at 1024 rows per chunk.
        sweep = [(0, 0)] + [(r, 16) for r in chunk_rows if r <= n]
        sweep += [(1024, k) for k in (1, 4, 64) if c == 10]
        for chunk, per_shard in sweep:
            path = tmp / "s.zarr"
            # Best of a few: single timings on a shared machine are noisy.
            write_s = min(
                write_cache(
                    path, logits, chunk_rows=chunk, chunks_per_shard=per_shard, overwrite=True
                )
                for _ in range(2)
            )
            read_s = min(read_all_seconds(path) for _ in range(3))
            with open_cache(path) as cache:
                chunk, shard = cache.attrs["chunk_rows"], cache.attrs["shard_rows"]
            rows.append(
                {
                    "classes": c,
                    "samples": n,
                    "default": per_shard == 0,
                    "chunk_rows": chunk,
                    "chunk_kib": chunk * c * 4 / 1024,
                    "chunks_per_shard": shard // chunk,
                    "write_mb_per_s": logits.nbytes / write_s / 1e6,
                    "read_all_mb_per_s": logits.nbytes / read_s / 1e6,
                    "bytes_per_sample": disk_bytes(path / "logits") / n,
                    "files": sum(1 for p in (path / "logits/c").rglob("*") if p.is_file()),
                }
            )
    print("\nChunk/shard sweep (float32, zstd:3, Gaussian logits, Zarr; * = the default layout)")
    print(
        f"{'C':>5}{'N':>8}{'chunk rows':>11}{'KiB':>8}{'per shard':>10}"
        f"{'write MB/s':>11}{'read MB/s':>10}{'B/sample':>9}{'shards':>7}"
    )
    for r in rows:
        rows_text = f"{r['chunk_rows']}{'*' if r['default'] else ''}"
        print(
            f"{r['classes']:>5}{r['samples']:>8}{rows_text:>11}{r['chunk_kib']:>8.0f}"
            f"{r['chunks_per_shard']:>10}{r['write_mb_per_s']:>11.0f}{r['read_all_mb_per_s']:>10.0f}"
            f"{r['bytes_per_sample']:>9.1f}{r['files']:>7}"
        )
    return rows


if __name__ == "__main__":
    main()
