"""Language-model distillation on the built-in corpus: held-out bits per token of a student
trained on the bytes alone (CE), from top-k token caches (k = 8 and 32, loss kl), from a
sampled token cache (K = 32 draws per token at T = 1, counts only, loss kl-sampled), and with the
teacher run online at every step (the dense KL over all V: what the cache approximates), at
equal steps, over 3 seeds; and what each costs in time.

Teacher: gpt_mini (4 layers, width 128, 842k parameters) trained on pystdlib:train (4,000
sequences of 64 bytes, 259k tokens) for 10 epochs. Students: gpt_nano (25k parameters), 8
epochs of batches of 32 sequences, AdamW lr 3e-3 cosine, alpha 0.5, T = 1, seeds 0, 1, 2.
Held out: pystdlib:test (600 sequences, 37.8k tokens). The caches are written by stage one's
token engine (`precompute_tokens`).

Speed, in this process (not whole processes), on 2 threads: precompute tokens/s against the
teacher's raw forward over the same batches; training steps/s from the cache and online,
against CE alone.

    python benchmarks/bench_lm_quality.py   # about 10 minutes on 2 cores

Prints a table and saves JSON (default benchmarks/results/lm_quality.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import open_cache, schema  # noqa: E402
from pipeline.core.config import PrecomputeConfig, TrainTeacherConfig  # noqa: E402
from pipeline.core.lm import LMBatch, fit_lm, measure_lm  # noqa: E402
from pipeline.data.sequences import load_sequences  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import save_checkpoint  # noqa: E402
from pipeline.student.token_losses import TokenTargets, token_loss  # noqa: E402
from pipeline.teacher.sequences import precompute_tokens  # noqa: E402

TRAIN = "pystdlib:train?limit=4000&length=64"
TEST = "pystdlib:test?limit=600&length=64"
CPU = torch.device("cpu")
SEEDS = (0, 1, 2)


def teacher(folder: Path) -> tuple[torch.nn.Module, Path, float]:
    train = load_sequences(TRAIN)
    torch.manual_seed(0)
    model = create_model("gpt_mini", 256, (train.context,))
    cfg = TrainTeacherConfig(epochs=10, batch_size=32, lr=2e-3)
    start = time.perf_counter()
    fit_lm(model, train, cfg, seed=0, device=CPU, desc="teacher")
    seconds = time.perf_counter() - start
    path = folder / "teacher.pt"
    meta = {"model": "gpt_mini", "model_kwargs": {}, "num_classes": 256,
            "input_shape": [train.context], "role": "teacher"}  # fmt: skip
    save_checkpoint(path, model, meta)
    return model.eval(), path, seconds


def cache(path: Path, k: int, folder: Path, sampled: bool = False):
    """A top-k (or, `sampled`, K-draws) token cache of the training set: its arrays and the
    seconds precompute took."""
    # The threads of the raw forward it is compared with (by default precompute would take
    # the choose_threads rule's count: 1 for this teacher).
    kind = {"sample_k": k} if sampled else {"topk": k}
    cfg = PrecomputeConfig(teachers=[str(path)], batch_size=64, threads=2, **kind)
    out = folder / f"{'sample' if sampled else 'top'}{k}.zarr"
    start = time.perf_counter()
    precompute_tokens(cfg, TRAIN, out)
    seconds = time.perf_counter() - start
    with open_cache(out) as c:
        names = [n.name for n in c.nodes() if n.name.startswith(("topk/", "sample/"))]
        arrays = {n: torch.from_numpy(np.asarray(c.read(n))[:, 0]) for n in names}
    for n in (schema.TOPK_INDICES, schema.SAMPLE_INDICES, schema.SAMPLE_COUNTS):
        if n in arrays:
            arrays[n] = arrays[n].long()
    return arrays, seconds


def raw_forward_seconds(model: torch.nn.Module) -> float:
    """The teacher alone over the training set, batches of 64 sequences: the floor of
    precompute."""
    seqs = load_sequences(TRAIN)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(seqs), 64):
            model(torch.from_numpy(seqs.tokens[first : first + 64]).long())
    return time.perf_counter() - start


def offline(arrays):
    def distil(b: LMBatch) -> torch.Tensor:
        rows = torch.from_numpy(b.rows)
        idx, values = arrays[schema.TOPK_INDICES][rows], arrays[schema.TOPK_VALUES][rows]
        t = TokenTargets(idx, 256, values, arrays[schema.TOPK_LSE][rows])
        return token_loss("kl", b.logits, t, 1.0)

    return distil


def sampled(arrays):
    def distil(b: LMBatch) -> torch.Tensor:
        rows = torch.from_numpy(b.rows)
        t = TokenTargets(arrays[schema.SAMPLE_INDICES][rows], 256,
                         counts=arrays[schema.SAMPLE_COUNTS][rows])  # fmt: skip
        return token_loss("kl-sampled", b.logits, t, 1.0)

    return distil


def online(model: torch.nn.Module):
    every = torch.arange(256)

    def distil(b: LMBatch) -> torch.Tensor:
        with torch.no_grad():
            t_logits = model(b.tokens)[b.mask]  # (N, V)
        t = TokenTargets(every.expand(len(t_logits), 256), 256, t_logits,
                         torch.logsumexp(t_logits, 1))  # fmt: skip
        return token_loss("kl", b.logits, t, 1.0)

    return distil


def student(seed: int, distil) -> tuple[dict[str, float], float]:
    train, test = load_sequences(TRAIN), load_sequences(TEST)
    torch.manual_seed(seed)
    model = create_model("gpt_nano", 256, (train.context,))
    cfg = TrainTeacherConfig(epochs=8, batch_size=32, lr=3e-3)
    torch.set_num_threads(2)
    start = time.perf_counter()
    fit_lm(model, train, cfg, seed=seed, device=CPU, distil=distil,
           alpha=0.0 if distil is None else 0.5, desc=f"student {seed}")  # fmt: skip
    return measure_lm(model, test, CPU), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lm_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, path, teacher_seconds = teacher(folder)
        teacher_test = measure_lm(model, load_sequences(TEST), CPU)
        print(f"teacher: {teacher_test['bits_per_token']:.4f} bits/token ({teacher_seconds:.0f} s)")
        raw = raw_forward_seconds(model)
        caches, precompute = {}, {}
        for k in (8, 32):
            caches[k], precompute[k] = cache(path, k, folder)
        draws, precompute["sampled-32"] = cache(path, 32, folder, sampled=True)
        runs = {"ce": None, "top-8": offline(caches[8]), "top-32": offline(caches[32]),
                "sampled-32": sampled(draws), "online": online(model)}  # fmt: skip
        results = {}
        for name, distil in runs.items():
            results[name] = [student(seed, distil) for seed in SEEDS]
            bits = [r["bits_per_token"] for r, _ in results[name]]
            secs = statistics.mean(s for _, s in results[name])
            print(f"{name:>7}: {statistics.mean(bits):.4f} ± {statistics.stdev(bits):.4f} "
                  f"bits/token, {secs:.1f} s per student")  # fmt: skip
    tokens = int((load_sequences(TRAIN).lengths - 1).sum())
    out = {
        "teacher": {"bits_per_token": teacher_test["bits_per_token"], "seconds": teacher_seconds},
        "students": {
            n: [{"seed": s, **r, "seconds": t} for s, (r, t) in zip(SEEDS, v, strict=True)]
            for n, v in results.items()
        },  # fmt: skip
        "speed": {
            "train_tokens": tokens,
            "raw_forward_seconds": raw,
            "precompute_seconds": precompute,
            "precompute_over_raw_tokens_per_s": {k: raw / s for k, s in precompute.items()},
            "training_over_ce_steps_per_s": {
                n: statistics.mean(t for _, t in results["ce"]) / statistics.mean(t for _, t in v)
                for n, v in results.items()
            },  # fmt: skip
        },
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["speed"], indent=2))


if __name__ == "__main__":
    main()
