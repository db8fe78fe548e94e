"""Scoring a language-model student on held-out sequences against its teacher's token cache:
bits per token and perplexity of the next tokens, and how often its most likely next token is
the teacher's (the cache's first top-k class; a sampled cache has none). The teacher is never
loaded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.cache import open_cache, schema
from pipeline.cache.tokens import require_token_cache
from pipeline.core.device import resolve_device, use_threads
from pipeline.core.errors import PipelineError
from pipeline.core.lm import measure_lm
from pipeline.data.sequences import load_sequences
from pipeline.evaluate.metrics import require_same_teacher
from pipeline.models.checkpoint import load_checkpoint


def evaluate_lm_student(
    student: Path,
    cache: Path,
    data: str,
    device: str = "auto",
    threads: int = 0,
    other_teacher: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, what they describe) of the student directory `student` on the sequences
    `data`, whose token cache (the teacher's) is `cache`: made by the student's own teacher
    unless `other_teacher`."""
    model, info = load_checkpoint(Path(student) / "student.pt")
    seqs = load_sequences(data)
    with open_cache(cache) as c:
        require_token_cache(c, cache, seqs)
        require_same_teacher(other_teacher, info, cache, c.attrs)
        if c.num_classes != info["num_classes"]:
            raise PipelineError(
                f"--student {student} has a vocabulary of {info['num_classes']}, the cache's "
                f"teacher {c.num_classes}"
            )
        top1 = None  # a sampled cache keeps draws, not the teacher's most likely token
        if c.backend.has(schema.TOPK_INDICES):
            top1 = c.read(schema.TOPK_INDICES)[:, 0, 0]
        else:
            print(f"note: --cache {cache} holds sampled targets, not top-k: no top-1 agreement "
                  "(bits per token and perplexity only)", file=sys.stderr)  # fmt: skip
        teacher = c.attrs["teacher"]["members"][0]
    use_threads(model, torch.from_numpy(seqs.tokens[:1]).long(), threads)
    numbers = measure_lm(model, seqs, resolve_device(device), teacher_top1=top1)
    described = {
        "student": str(student),
        "model": info.get("model"),
        "loss": info.get("loss"),
        "temperature": info.get("temperature"),
        "loss_settings": info.get("loss_settings"),
        "teacher": {"name": teacher.get("name"), "sha256": teacher.get("sha256")},
        "cache": str(cache),
        "data": data,
    }
    return numbers, described
