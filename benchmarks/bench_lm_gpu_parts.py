"""Where token precompute's time goes on a GPU: the teacher and data of bench_lm_gpu.py
(111M parameters, V = 32,768, 2.1M tokens, batches of 32 sequences, bf16 autocast), with
precompute run several times in one process, and one batch's parts timed alone.

- raw: the teacher's forward over every batch (after a warm-up batch);
- top32_a, top32_b: precompute --topk 32, the first and second time in the process;
  top32_nocomp: the same with --compression none; top128, top128_b: --topk 128, twice;
- load_teacher: load_teacher on the checkpoint (read, hash, rebuild, move to the GPU);
- batch_forward, batch_isfinite, batch_topk_lse_to_host: one batch's forward, a finiteness
  pass over its (32 x 1023, V) logits, and token_topk (float32 copy, top-k, log-sum-exp,
  the (n, k) results to the host).

    python benchmarks/bench_lm_gpu_parts.py --out benchmarks/results/lm_gpu_parts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_lm_gpu as b  # noqa: E402

from pipeline.cache.tokens import token_topk  # noqa: E402
from pipeline.core.config import PrecomputeConfig  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import save_checkpoint  # noqa: E402
from pipeline.teacher.sequences import precompute_tokens  # noqa: E402
from pipeline.teacher.teachers import load_teacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lm_gpu_parts.json")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a dry run on a CPU")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokens = np.random.default_rng(0).integers(0, b.V, (b.S, b.L), dtype=np.int32)
        np.save(folder / "tokens.npy", tokens)
        data = f"tokens:{folder / 'tokens.npy'}?vocab={b.V}"
        torch.manual_seed(0)
        model = create_model("causal_transformer", b.V, (b.L,), **b.TEACHER)
        save_checkpoint(folder / "t.pt", model, {"model": "causal_transformer", "num_classes": b.V,
                        "model_kwargs": b.TEACHER, "input_shape": [b.L]})  # fmt: skip
        out = {"raw": b.raw_forward(folder / "t.pt", data)}

        def run(name: str, **kw) -> None:
            cfg = PrecomputeConfig(teachers=[str(folder / "t.pt")], batch_size=b.BATCH,
                                   precision="bf16", device=b.DEVICE, **kw)  # fmt: skip
            b.sync()
            start = time.perf_counter()
            precompute_tokens(cfg, data, folder / f"{name}.zarr")
            out[name] = time.perf_counter() - start
            print(name, round(out[name], 2), flush=True)

        run("top32_a", topk=32)
        run("top32_b", topk=32)
        run("top32_nocomp", topk=32, compression="none")
        run("top128", topk=128)
        run("top128_b", topk=128)
        start = time.perf_counter()
        teacher = load_teacher(str(folder / "t.pt")).to(torch.device(b.DEVICE))
        b.sync()
        out["load_teacher"] = time.perf_counter() - start
        out.update(_one_batch(teacher, torch.from_numpy(tokens[: b.BATCH]).long().to(b.DEVICE)))
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def _one_batch(teacher, x: torch.Tensor) -> dict[str, float]:
    """The parts of one batch, the third of three repeats (the first two warm up)."""
    with torch.inference_mode(), torch.autocast(b.DEVICE, dtype=torch.bfloat16):
        for _ in range(3):
            b.sync()
            t0 = time.perf_counter()
            logits = teacher(x)
            b.sync()
            t1 = time.perf_counter()
            rows = logits[:, :-1].reshape(-1, b.V)
            bool(torch.isfinite(rows).all())
            t2 = time.perf_counter()
            token_topk(rows, 32)
            t3 = time.perf_counter()
    return {"batch_forward": t1 - t0, "batch_isfinite": t2 - t1, "batch_topk_lse_to_host": t3 - t2}


if __name__ == "__main__":
    main()
