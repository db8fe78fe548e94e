"""Token caches (pipeline/cache/tokens.py, pipeline/student/token_losses.py): how far each
token loss and its gradient are from the dense loss at k = 8, 32, 128 and T = 1, 2, 4, and how
many bytes a token takes on disk.

Fidelity. Teachers:
  synthetic  V = 131,072, N = 64 tokens. Token n's logits by rank r = 1..V are -a_n ln r +
             0.5 e (e standard normal), a_n = exp(N(ln 1.3, 0.25^2)), permuted at random and
             shifted by N(5, 2^2): a heavy tail, entropy printed (LM next-token entropies are
             a few nats).
  corpus     V = 256: gpt_micro trained on the built-in corpus (pystdlib:train, 2000
             sequences of 64 bytes, 6 epochs), its logits on 256 test tokens.
The student is near the teacher: s = t + N(0, 1) per logit. For each loss, the dense one is
written out in float64 over all V (kl: T^2 KL(p_T || q_T); reverse-kl: T^2 KL(q_T || p_T);
jsd: beta = 0.5) and the sparse one is the token loss on the top-k of the teacher (values,
indices, exact lse) computed by `token_topk`. Reported: the relative error of the loss, and
the angle between the gradients w.r.t. the student's logits (N * V flattened).

Size. Synthetic teachers as above at V = 32,768 and 262,144, 8,192 tokens, written by
`CacheWriter` as stage one writes a token cache (values float32, indices int16/int32, lse
float32, zstd:3): bytes on disk per token at k = 32 and 128. Then the same targets encoded as
a prototype (not the cache format): values as bfloat16 deltas from the largest (bytes
shuffled), indices sorted with their values and delta-coded (uint32 deltas, bytes shuffled),
each zstd level 19: what a denser format would reach.

    python benchmarks/bench_tokens.py   # 9 minutes on 2 cores (mostly the V = 262,144 teachers)

Prints tables and saves JSON (default benchmarks/results/tokens.json).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import CacheWriter, schema, store  # noqa: E402
from pipeline.cache.sparse import index_dtype  # noqa: E402
from pipeline.cache.tokens import token_topk  # noqa: E402
from pipeline.student.token_losses import TokenTargets, token_loss  # noqa: E402

KS = (8, 32, 128)
TEMPERATURES = (1.0, 2.0, 4.0)
LOSSES = ("kl", "kl-topk", "reverse-kl", "jsd")


def synthetic(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Heavy-tailed teacher logits (N, V), as the module doc says."""
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(torch.randn(n, 1, generator=g) * 0.25 + math.log(1.3))
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    logits = -a * ranks.log() + 0.5 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    perm = torch.argsort(torch.rand(n, vocab, generator=g), 1)
    logits = torch.gather(logits, 1, perm)
    return (logits + 5 + 2 * torch.randn(n, 1, generator=g, dtype=torch.float64)).float()


def corpus_teacher() -> torch.Tensor:
    """Logits (256, 256) of a gpt_micro trained on the built-in corpus."""
    from pipeline.core.config import TrainTeacherConfig
    from pipeline.core.lm import Positions, fit_lm
    from pipeline.data.sequences import load_sequences
    from pipeline.models import create_model

    train = load_sequences("pystdlib:train?limit=2000&length=64")
    torch.manual_seed(0)
    model = create_model("gpt_micro", 256, (64,))
    cfg = TrainTeacherConfig(epochs=6, batch_size=32, lr=3e-3)
    fit_lm(model, train, cfg, seed=0, device=torch.device("cpu"), desc="corpus teacher")
    test = load_sequences("pystdlib:test?limit=8&length=64")
    x, mask, _ = Positions(test).batch(np.arange(len(test)), "cpu")
    with torch.no_grad():
        return model.eval()(x)[mask][:256].float()


def entropy(t: torch.Tensor) -> float:
    p = torch.softmax(t.double(), 1)
    return float(-(torch.xlogy(p, p)).sum(1).mean())


def dense(name: str, t: torch.Tensor, s: torch.Tensor, temp: float) -> torch.Tensor:
    lp, lq = torch.log_softmax(t.double() / temp, 1), torch.log_softmax(s / temp, 1)
    p, q = lp.exp(), lq.exp()
    if name in ("kl", "kl-topk"):
        d = (p * (lp - lq)).sum(1)
    elif name == "reverse-kl":
        d = (q * (lq - lp)).sum(1)
    else:
        lm = torch.logaddexp(lp, lq) - math.log(2)
        d = 0.5 * (p * (lp - lm)).sum(1) + 0.5 * (q * (lq - lm)).sum(1)
    return temp**2 * d.mean()


def fidelity(teacher: torch.Tensor, label: str) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    student = teacher.double() + torch.randn(teacher.shape, generator=g, dtype=torch.float64)
    rows = []
    for k in KS:
        if k >= teacher.shape[1]:
            continue
        values, indices, lse = (torch.from_numpy(a) for a in token_topk(teacher, k))
        targets = TokenTargets(indices.long(), teacher.shape[1], values, lse)
        for temp in TEMPERATURES:
            for name in LOSSES:
                s_dense = student.clone().requires_grad_(True)
                ref = dense(name, teacher, s_dense, temp)
                ref.backward()
                s_sparse = student.float().clone().requires_grad_(True)
                got = token_loss(name, s_sparse, targets, temp)
                got.backward()
                ref, got = ref.detach(), got.detach()
                a, b = s_sparse.grad.double().flatten(), s_dense.grad.flatten()
                cos = float((a @ b) / (a.norm() * b.norm()))
                rows.append({
                    "teacher": label, "loss": name, "k": k, "T": temp,
                    "dense": float(ref), "sparse": float(got),
                    "rel_error": abs(float(got) - float(ref)) / float(ref),
                    "grad_angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
                })  # fmt: skip
    return rows


def synthetic_topk(n: int, vocab: int, k: int, seed: int) -> tuple[np.ndarray, ...]:
    """`token_topk` of `n` synthetic tokens, made 256 at a time (V = 262,144 in float64 for
    8,192 tokens would take 17 GB)."""
    parts = [token_topk(synthetic(256, vocab, seed + i), k) for i in range(n // 256)]
    return tuple(np.concatenate(a) for a in zip(*parts, strict=True))


def cache_bytes(targets: tuple[np.ndarray, ...], vocab: int, k: int, folder: Path) -> int:
    values, indices, lse = targets
    n = len(values)
    out = folder / f"v{vocab}-k{k}.zarr"
    record = {"k": k, "index_dtype": str(index_dtype(vocab))}
    with CacheWriter(out, sample_ids=np.arange(n), labels=np.zeros(n, np.int64), num_classes=vocab,
                     dims={schema.TOPK_DIM: k}, attrs={schema.TARGETS: "topk", schema.TOPK: record},
                     ) as w:  # fmt: skip
        w.add({schema.TOPK_VALUES: values[:, None], schema.TOPK_INDICES: indices[:, None],
               schema.TOPK_LSE: lse[:, None]})  # fmt: skip
        w.finish({"class_names": None})
    size = store.size(out)
    shutil.rmtree(out)
    return size


def prototype_bytes(targets: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Bytes per token of a denser encoding of the same top-k (see the module doc)."""
    import numcodecs

    values, indices, lse = targets
    order = np.argsort(indices, 1, kind="stable")
    idx = np.take_along_axis(indices.astype(np.int64), order, 1)
    deltas = np.diff(idx, axis=1, prepend=0).astype(np.uint32)  # (N, k), small numbers
    bf16 = torch.from_numpy(values).bfloat16().view(torch.int16).numpy()
    vals = np.take_along_axis(bf16, order, 1)
    zstd = numcodecs.Zstd(level=19)

    def packed(a: np.ndarray) -> int:
        shuffled = numcodecs.Shuffle(elementsize=a.dtype.itemsize).encode(np.ascontiguousarray(a))
        return len(zstd.encode(shuffled))

    n = len(values)
    return {
        "values_bf16": packed(vals) / n,
        "indices_delta": packed(deltas) / n,
        "lse": packed(lse) / n,
        "total": (packed(vals) + packed(deltas) + packed(lse)) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tokens.json")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(2)
    big = synthetic(64, 131_072, 0)
    corpus = corpus_teacher()
    print(f"entropy: synthetic {entropy(big):.2f} nats, corpus {entropy(corpus):.2f} nats")
    rows = fidelity(big, "synthetic V=131072") + fidelity(corpus, "corpus V=256")
    print(f"{'teacher':<20} {'loss':<11} {'k':>4} {'T':>3} {'rel.err':>9} {'angle°':>7}")
    for r in rows:
        print(f"{r['teacher']:<20} {r['loss']:<11} {r['k']:>4} {r['T']:>3g} "
              f"{r['rel_error']:>9.2e} {r['grad_angle_deg']:>7.2f}")  # fmt: skip
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in (32_768, 262_144):
            for k in (32, 128):
                targets = synthetic_topk(8192, vocab, k, 2)
                on_disk = cache_bytes(targets, vocab, k, Path(tmp)) / len(targets[0])
                proto = prototype_bytes(targets)
                sizes.append({"vocab": vocab, "k": k, "cache_bytes_per_token": on_disk,
                              "prototype_bytes_per_token": proto})  # fmt: skip
                print(f"V={vocab:>7} k={k:>3}: cache {on_disk:7.1f} B/token, prototype "
                      f"{proto['total']:6.1f} (values {proto['values_bf16']:.1f}, indices "
                      f"{proto['indices_delta']:.1f}, lse {proto['lse']:.1f})")  # fmt: skip
    result = {
        "entropy_nats": {"synthetic": entropy(big), "corpus": entropy(corpus)},
        "fidelity": rows,
        "size": sizes,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['seconds']} s; saved {args.out}")


if __name__ == "__main__":
    main()
