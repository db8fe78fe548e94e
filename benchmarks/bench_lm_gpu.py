"""Token-level distillation on a GPU: precompute and training throughput, whole processes and
in process, and the cache checked against the teacher's own forward on the device.

Teacher: a GPT-2-small-sized causal transformer (12 layers, width 768, 12 heads, context
1024) over a vocabulary of 32,768, randomly initialised (speed does not depend on training).
Data: 2,048 sequences of 1,024 random token ids (2.1M tokens) from a `tokens:` file. Student:
4 layers, width 512. The teacher runs in bfloat16 (autocast), students train in float32.

Measured:
- raw forward: the teacher alone over the same batches of 32 sequences (tokens/s), the floor
  of precompute; in process, and as a whole process (load, forward, exit);
- precompute-logits --topk 32 and 128: in process (`precompute_tokens`) and as a whole
  process (`pipeline precompute-logits`), tokens/s over the raw forward;
- the first batch of the top-32 cache against the teacher's own logits on the device, same
  batch: bit-equal values and indices, equal lse;
- train-student from the top-32 cache (kl) and with CE alone (the same loop), one epoch,
  tokens/s; online KD (the teacher's bf16 forward at every step) for comparison.

    python benchmarks/bench_lm_gpu.py --out benchmarks/results/lm_gpu.json   # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache import open_cache, schema  # noqa: E402
from pipeline.core.config import PrecomputeConfig  # noqa: E402
from pipeline.core.lm import LMBatch, fit_lm  # noqa: E402
from pipeline.data.sequences import load_sequences  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.student.lm import train_lm_student  # noqa: E402
from pipeline.student.students import TrainStudentConfig  # noqa: E402
from pipeline.student.token_losses import TokenTargets, token_loss  # noqa: E402
from pipeline.teacher.sequences import precompute_tokens  # noqa: E402

V, L, S, BATCH = 32768, 1024, 2048, 32
TEACHER = {"layers": 12, "heads": 12, "width": 768}
STUDENT = {"layers": 4, "heads": 8, "width": 512}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ["--small"] if "--small" in sys.argv else []
if SMALL:  # a dry run of the script on a CPU, in seconds
    V, L, S, BATCH = 512, 32, 64, 16
    TEACHER = STUDENT = {"layers": 1, "heads": 2, "width": 32}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def raw_forward(teacher_path: Path, data: str) -> float:
    """Seconds of the teacher's bf16 forward over every batch (after one warm-up batch)."""
    model, _ = load_checkpoint(teacher_path)
    model = model.to(DEVICE).eval()
    seqs = load_sequences(data)
    x = torch.from_numpy(seqs.tokens).long()
    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(x[:BATCH].to(DEVICE))
        sync()
        start = time.perf_counter()
        for first in range(0, S, BATCH):
            model(x[first : first + BATCH].to(DEVICE))
        sync()
    return time.perf_counter() - start


def whole(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def check_first_batch(teacher_path: Path, data: str, cache: Path) -> dict[str, bool]:
    model, _ = load_checkpoint(teacher_path)
    model = model.to(DEVICE).eval()
    seqs = load_sequences(data)
    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits = model(torch.from_numpy(seqs.tokens[:BATCH]).long().to(DEVICE))
    rows = logits[:, :-1].reshape(-1, V).float()  # every position but the last predicts one
    top = rows.topk(32, 1)
    n = len(rows)
    with open_cache(cache) as c:
        values = np.asarray(c.read(schema.TOPK_VALUES, slice(0, n)))[:, 0]
        indices = np.asarray(c.read(schema.TOPK_INDICES, slice(0, n)))[:, 0]
        lse = np.asarray(c.read(schema.TOPK_LSE, slice(0, n)))[:, 0]
    return {
        "values_bit_equal": bool(np.array_equal(values, top.values.cpu().numpy())),
        "indices_equal": bool(np.array_equal(indices, top.indices.cpu().numpy())),
        "lse_equal": bool(np.array_equal(lse, torch.logsumexp(rows, 1).cpu().numpy())),
    }


def train(cache: Path, data: str, folder: Path, loss: str) -> float:
    cfg = TrainStudentConfig(model="causal_transformer", model_kwargs=STUDENT, loss=loss,
                             temperature=1.0, loss_settings={"alpha": 0.5}, epochs=1,
                             batch_size=16, lr=1e-3, device=DEVICE,
                             cache_memory="8GiB")  # fmt: skip
    sync()
    start = time.perf_counter()
    train_lm_student(cfg, cache, data, folder / f"student-{loss}")
    sync()
    return time.perf_counter() - start


def online(teacher_path: Path, data: str) -> float:
    teacher, _ = load_checkpoint(teacher_path)
    teacher = teacher.to(DEVICE).eval()
    seqs = load_sequences(data)
    torch.manual_seed(0)
    student = create_model("causal_transformer", V, (L,), **STUDENT)
    every = torch.arange(V, device=DEVICE)

    def distil(b: LMBatch) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            t = teacher(b.tokens)[b.mask].float()  # (N, V)
        targets = TokenTargets(every.expand(len(t), V), V, t, torch.logsumexp(t, 1))
        return token_loss("kl", b.logits, targets, 1.0)

    cfg = TrainStudentConfig(epochs=1, batch_size=16, lr=1e-3)
    sync()
    start = time.perf_counter()
    fit_lm(student, seqs, cfg, seed=0, device=torch.device(DEVICE), distil=distil, alpha=0.5)
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lm_gpu.json")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a dry run on a CPU")
    ap.add_argument("--raw-only", nargs=2, metavar=("TEACHER", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_only:  # the whole-process floor: import, load, forward, exit
        raw_forward(Path(args.raw_only[0]), args.raw_only[1])
        return
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else None
    out: dict = {"gpu": gpu, "torch": torch.__version__, "tokens": S * (L - 1),
                 "vocab": V, "teacher": TEACHER, "student": STUDENT}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        np.save(folder / "tokens.npy", rng.integers(0, V, (S, L), dtype=np.int32))
        data = f"tokens:{folder / 'tokens.npy'}?vocab={V}"
        torch.manual_seed(0)
        model = create_model("causal_transformer", V, (L,), **TEACHER)
        teacher = folder / "teacher.pt"
        save_checkpoint(teacher, model, {"model": "causal_transformer", "model_kwargs": TEACHER,
                                         "num_classes": V, "input_shape": [L]})  # fmt: skip
        out["teacher_params"] = sum(p.numel() for p in model.parameters())
        out["raw_forward_s"] = raw_forward(teacher, data)
        out["raw_forward_process_s"] = whole(
            [sys.executable, __file__, *SMALL, "--raw-only", str(teacher), data]
        )
        for k in (32, 128):
            cfg = PrecomputeConfig(teachers=[str(teacher)], topk=k, batch_size=BATCH,
                                   precision="bf16", device=DEVICE)  # fmt: skip
            sync()
            start = time.perf_counter()
            precompute_tokens(cfg, data, folder / f"top{k}.zarr")
            out[f"precompute_top{k}_s"] = time.perf_counter() - start
            cli = [sys.executable, "-c", "from pipeline.cli import main; main()"]
            out[f"precompute_top{k}_process_s"] = whole([
                *cli, "precompute-logits", "--teacher", str(teacher), "--data", data,
                "--topk", str(k), "--batch-size", str(BATCH), "--precision", "bf16",
                "--out", str(folder / f"p{k}.zarr")])  # fmt: skip
            print(k, out, flush=True)
        out["check_first_batch"] = check_first_batch(teacher, data, folder / "top32.zarr")
        for loss in ("ce", "kl"):
            out[f"train_{loss}_s"] = train(folder / "top32.zarr", data, folder, loss)
            print(loss, out[f"train_{loss}_s"], flush=True)
        out["train_online_s"] = online(teacher, data)
    tokens = out["tokens"]
    out["tokens_per_s"] = {k[:-2]: tokens / v for k, v in out.items() if k.endswith("_s")}
    raw, raw_p = out["raw_forward_s"], out["raw_forward_process_s"]
    out["ratios"] = {
        **{f"precompute_top{k}_over_raw": raw / out[f"precompute_top{k}_s"] for k in (32, 128)},
        **{
            f"precompute_top{k}_process_over_raw_process": raw_p
            / out[f"precompute_top{k}_process_s"]
            for k in (32, 128)
        },  # fmt: skip
        "train_cache_over_ce": out["train_ce_s"] / out["train_kl_s"],
        "train_online_over_cache": out["train_kl_s"] / out["train_online_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
