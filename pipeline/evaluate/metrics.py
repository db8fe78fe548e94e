"""Scores of a student on the test split against the cached teacher (teacher not loaded).

Accuracy (top-1, top-5), agreement with the teacher, KL(teacher ‖ student) at T = 1, expected
calibration error, parameter count, FLOPs per sample, size on disk, and CPU latency (measured,
so kept in the run record, not in the metrics). The teacher's own figures come from the
test-split cache, on the same rows.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.store import location
from pipeline.core.config import EvaluateConfig, as_dict
from pipeline.core.device import forward_flops, resolve_device, use_threads
from pipeline.core.errors import PipelineError
from pipeline.core.training import predict
from pipeline.data import TransferSet, load_transfer_set
from pipeline.models.checkpoint import load_checkpoint
from pipeline.student.students import checkpoint_of, teacher_fingerprint
from pipeline.student.targets import TargetBatch, open_targets

LATENCY_BATCHES = (1, 256)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float | None:
    """Share of labelled rows whose label is among the k largest logits (k capped at C)."""
    known = labels >= 0
    if not known.any():
        return None
    k = min(k, logits.shape[1])
    top = np.argsort(-logits[known], axis=1, kind="stable")[:, :k]  # (n, k)
    return float((top == labels[known, None]).any(axis=1).mean())


def expected_calibration_error(
    logits: np.ndarray, labels: np.ndarray, bins: int = 15
) -> float | None:
    """ECE over the labelled rows: sum over equal-width confidence bins (lo, hi] of
    (rows in bin / rows) · |accuracy in bin - mean confidence in bin| (Guo et al. 2017)."""
    known = labels >= 0
    if not known.any():
        return None
    p = torch.from_numpy(logits[known]).double().softmax(1).numpy()
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == labels[known]).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def metrics(
    student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, bins: int = 15
) -> dict[str, float | None]:
    """Student and teacher scores on the same rows.

    student, teacher: (N, C) logits; labels: (N,) with -1 where unknown (accuracies and ECE
    use the labelled rows; agreement and KL use every row).
    """
    s, t = torch.from_numpy(student).double(), torch.from_numpy(teacher).double()
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
    return {
        "accuracy": top_k_accuracy(student, labels, 1),
        "top5_accuracy": top_k_accuracy(student, labels, 5),
        "teacher_accuracy": top_k_accuracy(teacher, labels, 1),
        "teacher_top5_accuracy": top_k_accuracy(teacher, labels, 5),
        "agreement": float((s.argmax(1) == t.argmax(1)).double().mean()),
        "kl_teacher_student": float(kl),
        "ece": expected_calibration_error(student, labels, bins),
        "teacher_ece": expected_calibration_error(teacher, labels, bins),
        "num_samples": int(len(labels)),
        "num_labelled": int((labels >= 0).sum()),
    }


@torch.inference_mode()
def cpu_latency(model: nn.Module, inputs: np.ndarray, runs: int, threads: int) -> dict[str, float]:
    """Median milliseconds per sample on the CPU at batch sizes 1 and 256, on `threads`
    threads (0: torch's default). Batches are the first rows of `inputs`, repeated to 256."""
    model = model.cpu().eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        result = {}
        for batch in LATENCY_BATCHES:
            x = np.resize(inputs, (batch, *inputs.shape[1:])).astype(np.float32)
            x = torch.from_numpy(x)
            for _ in range(2):  # warm-up: allocator, kernels
                model(x)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
            result[str(batch)] = 1000 * statistics.median(times) / batch
        return result
    finally:
        torch.set_num_threads(before)


def loss_settings_of(info: dict[str, Any]) -> dict[str, float]:
    """A student's loss settings (name -> value) from its checkpoint info: `loss_settings`,
    else `loss_weights` (students written before settings were generalised)."""
    settings = info.get("loss_settings")
    if settings is None:
        settings = info.get("loss_weights")
    return dict(settings or {})


def _refuse_nonfinite(logits: torch.Tensor, sample_ids: np.ndarray, student: Path) -> None:
    """A student whose outputs are NaN or Inf has no accuracy to report (and JSON no number
    to hold): one line naming the first samples."""
    bad = ~torch.isfinite(torch.as_tensor(logits)).all(dim=1)
    if bad.any():
        ids = np.asarray(sample_ids)[bad.numpy()][:5].tolist()
        raise PipelineError(
            f"student {student} outputs NaN/Inf for {int(bad.sum())} test samples (sample ids "
            f"{ids}): its weights are not finite; retrain it (train-student refuses to write one)"
        )


def evaluate_student(cfg: EvaluateConfig, student: Path, cache: Path, data: str) -> dict[str, Any]:
    """Score the student directory `student` on `data` against the teacher in the test cache
    `cache`; returns the evaluate result (what metrics.json holds). A student of the user's
    own factory is rebuilt only when `cfg.model` names it (`pipeline.models.checkpoint`)."""
    ckpt = checkpoint_of(student)
    cfg.validate()  # ranges of a config built in code (resolve has checked the CLI's)
    model, info = load_checkpoint(ckpt, cfg.model or None, code_from=cfg.source("model"))
    ts = load_transfer_set(data)
    if tuple(info["input_shape"]) != ts.input_shape:
        raise PipelineError(
            f"student takes inputs {tuple(info['input_shape'])}, --data {data} has {ts.input_shape}"
        )
    combine = info.get("config", {}).get("combine", "mean-logits")
    teacher, attrs = _teacher_logits(cfg, info, location(cache), ts, combine)
    device = resolve_device(cfg.device)
    sample = torch.from_numpy(ts.inputs[:1])
    flops = forward_flops(model, sample)
    threads = use_threads(model, sample, cfg.threads)
    logits = predict(model, ts.inputs, cfg.batch_size, device, desc="evaluate")  # (N, C)
    _refuse_nonfinite(logits, ts.sample_ids, student)
    latency = None
    if cfg.latency_runs:
        latency = cpu_latency(model, ts.inputs, cfg.latency_runs, cfg.latency_threads)
    members = (attrs.get("teacher") or {}).get("members", [])
    return {
        **_student_fields(info, ckpt, combine),
        **metrics(logits, teacher, ts.labels, cfg.ece_bins),
        "flops_per_sample": flops,
        # Measured, not computed: these go to the run record (pipeline.evaluate.results.RUN_KEYS).
        "latency_ms_per_sample": latency,
        "latency_threads": cfg.latency_threads or threads,
        "threads": threads,
        "teacher": {
            "models": [m.get("name") for m in members],
            "num_params": sum(m.get("num_params") or 0 for m in members),
            "fingerprint": teacher_fingerprint(attrs),
            "combine": (attrs.get("teacher") or {}).get("combine"),
        },
        "data": data,
        "config": as_dict(cfg),
    }


def _teacher_logits(
    cfg: EvaluateConfig, info: dict[str, Any], cache: Path, ts: TransferSet, combine: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The teacher's (N, C) logits at T = 1 from the cache, its members combined as the
    student's were, and the cache's attributes."""
    targets, attrs = open_targets(
        cache, ts, cross_modal=cfg.cross_modal, combine=(combine,), mode="memory"
    )
    require_same_teacher(cfg.other_teacher, info, cache, attrs)
    if int(attrs["num_classes"]) != info["num_classes"]:
        raise PipelineError(
            f"student has {info['num_classes']} classes but cache {cache} has "
            f"{attrs['num_classes']}"
        )
    augment = (attrs.get("views") or {}).get("augment")
    if augment:
        raise PipelineError(
            f"--cache {cache}: its teacher outputs are of augmented views ({augment}); "
            "evaluate compares on the raw inputs: precompute the test split without --augment"
        )
    members = None if targets.members is None else targets.members[:, :, 0]  # (M, N, C)
    teacher = targets.teacher(TargetBatch(targets.logits[:, 0], members), combine, 1.0)
    return teacher.numpy(), attrs


def require_same_teacher(
    other_teacher: bool, info: dict[str, Any], cache: Path, attrs: dict[str, Any]
) -> None:
    """Refuse a test cache made by another teacher than the student's train cache (its
    agreement and KL would compare the student with a teacher it never saw), unless
    --other-teacher says that is the point."""
    trained_on = (info.get("cache") or {}).get("teacher_fingerprint")
    here = teacher_fingerprint(attrs)
    if other_teacher or trained_on is None or here is None or trained_on == here:
        return
    names = "+".join(m.get("name") or "?" for m in (attrs.get("teacher") or {}).get("members", []))
    raise PipelineError(
        f"--cache {cache} was made by another teacher ({names}, {here}) than the student's "
        f"train cache ({trained_on}); pass --other-teacher to compare with it anyway"
    )


def _student_fields(info: dict[str, Any], ckpt: Path, combine: str) -> dict[str, Any]:
    """What the result says about the student: its model, size and how it was trained."""
    train_cfg = info.get("config", {})
    distils = train_cfg.get("loss") != "ce"
    settings = loss_settings_of(info)
    return {
        "student": info["name"],
        "preset": info.get("preset"),
        "model": info["model"],
        "num_params": info["num_params"],
        "size_bytes": ckpt.stat().st_size,
        "loss": train_cfg.get("loss"),
        "temperature": train_cfg.get("temperature") if distils else None,
        "alpha": settings.get("alpha", train_cfg.get("alpha")),
        "loss_settings": settings,
        "combine": combine,
        "labeled_fraction": train_cfg.get("labeled_fraction"),
        "training": info.get("log"),  # a row per epoch: loss, held-out accuracy, lr
    }
