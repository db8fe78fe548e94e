"""Stage two for language models: a causal student trained from a token cache
(`pipeline.cache.tokens`) with a token-level loss (`pipeline.student.token_losses`).

The student never sees the teacher: each batch's distilled positions are rows of the cache,
read from its targets (top-k values, indices and lse: a few bytes per token), held in memory
or streamed a window of sequences at a time within --cache-memory
(`pipeline.student.token_targets`).
The loss is (1 - alpha) CE on the next tokens + alpha times the token loss at T; `ce` trains
on the next tokens alone. The student's vocabulary is the cache's. The output's rules are
every student's (`pipeline.student.distill`): a lock, a resume checkpoint and a DVCLive
log beside it while it trains, the directory moved into place whole.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import schema
from pipeline.core import distributed
from pipeline.core.config import as_dict
from pipeline.core.device import resolve_device, seed_everything, use_threads
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import OutputLock, check_writable, remove
from pipeline.core.lm import LANGUAGE_MODELS, LMBatch, check_takes_tokens, fit_lm
from pipeline.core.runrecord import write_record
from pipeline.core.training import Trainee
from pipeline.data.sequences import SequenceSet, load_sequences
from pipeline.models import count_parameters, create_model
from pipeline.models.hf import registry_form
from pipeline.student.distill import check_outputs, check_resume
from pipeline.student.livelog import LiveLog, clear_stale
from pipeline.student.students import (
    CHECKPOINT,
    Student,
    TrainStudentConfig,
    teacher_fingerprint,
    write_student,
)
from pipeline.student.token_losses import TOKEN_LOSSES, TokenTargets, token_loss, token_settings
from pipeline.student.token_targets import TokenTargetSource


def train_lm_student(
    cfg: TrainStudentConfig,
    cache: Path,
    data: str,
    out: Path,
    overwrite: bool = False,
    resume: bool = False,
    name: str | None = None,
) -> Path:
    """Distil the causal model `cfg.model` from the token cache `cache` on the sequences
    `data`; write a student directory at `out`. Each epoch writes a resume checkpoint
    (OUT.resume.pt) and a DVCLive row (OUT.dvclive), as for every student; `resume`
    continues an interrupted run. Under torchrun every rank trains its share of each batch
    (DDP) and rank 0 alone locks, logs and writes (pipeline.core.distributed)."""
    cfg = for_sequences(cfg)
    student = Student(cfg, Path(out), name)
    if cfg.loss not in (*TOKEN_LOSSES, "ce"):
        raise PipelineError(
            f"{cfg.source('loss')} {cfg.loss}: a language model trains with a token loss "
            f"({', '.join(sorted(TOKEN_LOSSES))}) or ce"
        )
    check_outputs([student], Path(cache), data, "--out")
    ranks = distributed.from_env()
    with ExitStack() as stack:
        stack.callback(distributed.stop, ranks)
        if ranks.main:
            stack.enter_context(OutputLock(student.out))
            _prepare(student, overwrite, resume)
        trainee, info, threads = _train(student, Path(cache), data, resume, ranks)
        if ranks.main:
            write_student(student.out, trainee.model.cpu(), info, student.live_path,
                          overwrite, student.resume_path)  # fmt: skip
            facts = {"command": "train-student", "threads": threads,
                     "resumed": trainee.resumed, "ranks": ranks.world}  # fmt: skip
            write_record(student.out, facts, identity=student.out / CHECKPOINT)
            trainee.discard_checkpoint()
        distributed.barrier(ranks)  # every rank returns once rank 0 has written
    return student.out


def _train(student: Student, cache: Path, data: str, resume: bool, ranks):
    """Build the student and train it; (its trainee, its info, the threads it used)."""
    cfg = student.cfg
    seqs = load_sequences(data)
    source = TokenTargetSource(cache, seqs, cfg)
    try:
        attrs = source.attrs
        seed_everything(cfg.seed)
        device = distributed.start(ranks, resolve_device(cfg.device))
        vocab = int(attrs["num_classes"])
        model_name, kwargs = student_model(cfg, vocab, seqs.context)
        model = create_model(model_name, vocab, (seqs.context,), cfg.source("model"), **kwargs)
        check_takes_tokens(model, seqs, vocab, f"{cfg.source('model')} {cfg.model}")
        trainee = _trainee(student, model, data, seqs, attrs)
        threads = use_threads(model, torch.from_numpy(seqs.tokens[:1]).long(), cfg.threads)
        distil, alpha = None, 0.0
        if cfg.loss != "ce":
            alpha = cfg.loss_settings["alpha"]
            distil = _distil(cfg, source, device)
        try:
            log = fit_lm(model, seqs, cfg, seed=cfg.seed, device=device, distil=distil,
                         alpha=alpha, desc="train-student", trainee=trainee, resume=resume,
                         plan=source.plan(cfg.batch_size, cfg.seed), ranks=ranks)  # fmt: skip
        except BaseException:  # curves no resume checkpoint backs are not left behind
            if ranks.main and not student.resume_path.exists():
                remove(student.live_path)
            raise
    finally:
        source.close()
    return trainee, _info(cfg, model, vocab, seqs, data, cache, attrs, log), threads


# Keys that mean something for samples only, and their defaults: given otherwise, refused.
SAMPLE_ONLY = {"feature_losses": [], "views": 0, "labeled_fraction": 1.0, "holdout": 0.1,
               "cross_modal": False, "combine": "mean-logits"}  # fmt: skip


def for_sequences(cfg: TrainStudentConfig) -> TrainStudentConfig:
    """The config a language-model student trains with: `kl` at T = 1 where --loss and
    --temperature were left at their defaults (the sample defaults, kd at T = 4, are no token
    loss, and top-k targets are a T = 1 tool: docs/sequences.md); sample-only keys set by the
    user refused, and so is the default student (a sample model)."""
    given = cfg._sources
    for key, default in SAMPLE_ONLY.items():
        if key in given and getattr(cfg, key) != default:
            raise PipelineError(
                f"{cfg.source(key)}: not available for sequence data (language models)"
            )
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}

    def unset(key: str) -> bool:  # neither given nor set in code
        return key not in given and getattr(cfg, key) == defaults[key]

    if unset("model"):
        raise PipelineError(
            f"sequence data trains a language model and the default student ({cfg.model}) "
            f"takes samples: give --student (a language model is {LANGUAGE_MODELS})"
        )
    changes = {k: v for k, v in (("loss", "kl"), ("temperature", 1.0)) if unset(k)}
    if not changes:
        return cfg
    new = dataclasses.replace(cfg, **changes)
    new._sources = dict(given)
    if "loss" in changes:  # the settings the user gave, on kl's table
        settings = [(given[f"loss_settings.{k}"], k, v) for k, v in cfg.loss_settings.items()
                    if f"loss_settings.{k}" in given]  # fmt: skip
        new.loss_settings = token_settings("kl", settings)
    return new


def _prepare(student: Student, overwrite: bool, resume: bool) -> None:
    """The output's checks, under its lock: writable, an interrupted run's checkpoint
    continued only with --resume, a killed run's training log cleared."""
    check_writable(student.out, overwrite)
    check_resume(student, overwrite, resume)
    clear_stale(student.live_path)
    if resume and not student.resume_path.exists():  # said, not silently started afresh
        print(f"note: --resume: no {student.resume_path}, so {student.out} trains from epoch 1",
              file=sys.stderr)  # fmt: skip


def _trainee(student: Student, model, data: str, seqs: SequenceSet, attrs: dict) -> Trainee:
    """The resume checkpoint and live log of `model`; a resumed run must match the settings,
    the sequences and the very cache (its attributes' digest)."""
    cache_identity = attrs.get("attrs_digest", {}).get("value")
    return Trainee(
        student.name,
        model,
        None,
        student.cfg,
        checkpoint=student.resume_path,
        identity=student.identity(data, seqs.fingerprint(), cache_identity),
        live=lambda rows: LiveLog(student.live_path, rows),
    )


def student_model(cfg: TrainStudentConfig, vocab: int, context: int) -> tuple[str, dict[str, Any]]:
    """The registry name and kwargs of --student (`pipeline.models.hf.registry_form`)."""
    return registry_form(cfg.model, cfg.model_kwargs, vocab, context, cfg.source("model"))


def _distil(cfg: TrainStudentConfig, source: TokenTargetSource, device):
    """The distillation term of a batch: its rows' targets, read from `source`."""
    vocab = int(source.attrs["num_classes"])
    settings = {k: v for k, v in cfg.loss_settings.items() if k != "alpha"}
    sample = source.attrs.get(schema.SAMPLE) or {}

    def at(name: str, rows: np.ndarray) -> torch.Tensor | None:
        values = source.rows(name, rows)
        return None if values is None else values.to(device)

    def distil(batch: LMBatch) -> torch.Tensor:
        rows = batch.rows
        if schema.SAMPLE_COUNTS in source.nodes:
            tp = sample.get("proposal_temperature", 1.0)
            idx, counts = at(schema.SAMPLE_INDICES, rows), at(schema.SAMPLE_COUNTS, rows)
            values = at(schema.SAMPLE_VALUES, rows)
            t = TokenTargets(idx, vocab, values, counts=counts, proposal_temperature=tp)
        else:
            t = TokenTargets(at(schema.TOPK_INDICES, rows), vocab, at(schema.TOPK_VALUES, rows),
                             at(schema.TOPK_LSE, rows))  # fmt: skip
        return token_loss(cfg.loss, batch.logits, t, cfg.temperature, **settings)

    return distil


def _info(cfg, model, vocab, seqs, data, cache, attrs, log) -> dict[str, Any]:
    return {
        "role": "student",
        **dict(
            zip(("model", "model_kwargs"), student_model(cfg, vocab, seqs.context), strict=True)
        ),
        "num_classes": vocab,
        "input_shape": [seqs.context],
        "num_params": count_parameters(model),
        "loss": cfg.loss,
        "temperature": cfg.temperature,
        "loss_settings": cfg.loss_settings,
        "config": as_dict(cfg),
        "cache": {
            "path": str(cache),
            "identity": attrs.get("attrs_digest", {}).get("value"),
            "teacher_fingerprint": teacher_fingerprint(attrs),
        },  # fmt: skip
        "data": {"spec": data, "fingerprint": seqs.fingerprint()},
        "log": log,
    }
