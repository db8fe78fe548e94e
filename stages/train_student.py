"""Stage: train students against cached teacher logits. The teacher is never loaded.

`train` is shared with `stages.train_students`: it loads the transfer set and the cache once,
then trains every student, those that share a data pipeline (epochs, batch size, seed,
labelled fraction, device) in lockstep on the same batches.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.ensemble import COMBINE_METHODS
from pipeline.checkpoint import save_checkpoint
from pipeline.config import TrainStudentConfig, as_dict
from pipeline.data import TransferSet, load_transfer_set, mask_labels
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_output, check_writable
from pipeline.losses import bind_loss, get_loss, loss_params
from pipeline.models import count_parameters, create_model, list_models
from pipeline.students import CHECKPOINT, INFO, LOG, checkpoint_of  # noqa: F401
from pipeline.targets import Targets, check_cache, open_targets, parse_size
from pipeline.training import (
    Optim,
    TrainData,
    Trainee,
    check_output_classes,
    fit_many,
    resolve_device,
    seed_everything,
)


@dataclass
class Student:
    """One student to train: its resolved config and output directory."""

    cfg: TrainStudentConfig
    out: Path
    preset: str | None = None  # the students.<preset> entry it came from, if any
    weights: dict[str, float] = field(default_factory=dict)  # loss weights, filled by `check`

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def uses_teacher(self) -> bool:
        return get_loss(self.cfg.loss).uses_teacher

    @property
    def resume_path(self) -> Path:
        """Per-epoch checkpoint beside the output; removed once the output is written."""
        return self.out.with_name(self.out.name + ".resume.pt")

    def check(self) -> None:
        """Reject impossible settings before any data is read."""
        cfg = self.cfg
        self.weights = loss_params(cfg.loss, cfg.alpha, cfg.beta, cfg.gamma)
        if cfg.temperature <= 0:
            raise PipelineError(f"--temperature must be > 0, got {cfg.temperature}")
        if not 0.0 <= cfg.labeled_fraction <= 1.0:
            raise PipelineError(f"labeled_fraction must be in [0, 1], got {cfg.labeled_fraction}")
        if cfg.combine not in COMBINE_METHODS:
            raise PipelineError(
                f"--combine {cfg.combine!r}: expected one of {', '.join(COMBINE_METHODS)}"
            )
        if cfg.model not in list_models():
            raise PipelineError(f"unknown model '{cfg.model}' (valid: {', '.join(list_models())})")
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise PipelineError(
                f"epochs and batch_size must be >= 1, got {cfg.epochs}, {cfg.batch_size}"
            )
        optim(cfg).check(cfg.epochs)
        parse_size(cfg.cache_memory)
        if cfg.threads < 0:
            raise PipelineError(f"threads must be >= 0, got {cfg.threads}")

    def pipeline_key(self) -> tuple:
        """Students with equal keys can train on the same batches."""
        c = self.cfg
        return (
            c.epochs,
            c.batch_size,
            c.seed,
            c.labeled_fraction,
            c.device,
            c.threads,
            self.uses_teacher,
        )


def optim(cfg: TrainStudentConfig) -> Optim:
    return Optim(
        cfg.optimizer,
        cfg.lr,
        cfg.weight_decay,
        cfg.momentum,
        cfg.schedule,
        list(cfg.milestones),
        cfg.lr_decay,
    )


def run(
    cfg: TrainStudentConfig,
    cache: Path,
    data: str,
    out: Path,
    name: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> Path:
    """Distil `cfg.model` from the cache at `cache` on `data`; write a student dir at `out`.

    `name` is the students.<name> preset the config came from (recorded only).
    """
    (path,) = train([Student(cfg, Path(out), name)], Path(cache), data, overwrite, resume)
    return path


def train(
    students: list[Student],
    cache: Path,
    data: str,
    overwrite: bool = False,
    resume: bool = False,
) -> list[Path]:
    """Train `students` from one loaded transfer set and cache; returns their directories."""
    for s in students:
        s.check()
        check_writable(s.out, overwrite)
    outs = [str(s.out.resolve()) for s in students]
    if len(set(outs)) != len(outs):
        raise PipelineError(f"two students would write the same directory: {sorted(outs)}")
    ts = load_transfer_set(data)
    targets, attrs = _open(students, Path(cache), ts)

    groups: dict[tuple, list[Student]] = {}
    for s in students:
        groups.setdefault(s.pipeline_key(), []).append(s)
    for group in groups.values():
        _train_group(group, ts, targets, attrs, data, Path(cache), overwrite, resume)
    return [s.out for s in students]


def _open(students: list[Student], cache: Path, ts: TransferSet) -> tuple[Targets | None, dict]:
    """One read of the cache for every student (only its checks when none needs a teacher)."""
    # The fingerprint check is skipped only if every student asked for cross-modal joining.
    cross_modal = all(s.cfg.cross_modal for s in students)
    readers = [s for s in students if s.uses_teacher]
    if not readers:
        return None, check_cache(cache, ts, cross_modal)
    return open_targets(
        cache,
        ts,
        cross_modal=cross_modal,
        combine=tuple(sorted({s.cfg.combine for s in readers})),
        budget=min(parse_size(s.cfg.cache_memory) for s in readers),
    )


def _train_group(
    group: list[Student],
    ts: TransferSet,
    targets: Targets | None,
    attrs: dict[str, Any],
    data: str,
    cache: Path,
    overwrite: bool,
    resume: bool,
) -> None:
    first = group[0].cfg
    num_classes = int(attrs["num_classes"])
    if first.threads:
        # Small models train faster on one thread than on several contending ones.
        torch.set_num_threads(first.threads)
    device = resolve_device(first.device)
    labels = mask_labels(ts.labels, first.labeled_fraction, first.seed)
    if group[0].uses_teacher:
        rows = TrainData(torch.from_numpy(ts.inputs), torch.from_numpy(labels), targets)
        for s in group:
            needs_labels = get_loss(s.cfg.loss).alpha_mixes_ce and s.weights["alpha"] < 1.0
            if needs_labels and not (labels >= 0).any():
                raise PipelineError(
                    f"--data {data} has no labels: use --alpha 1 with loss {s.cfg.loss}, "
                    "or --loss soft"
                )
    else:
        keep = labels >= 0
        if not keep.any():
            raise PipelineError(f"loss {first.loss!r} needs labels, and --data {data} has none")
        rows = TrainData(torch.from_numpy(ts.inputs[keep]), torch.from_numpy(labels[keep]))

    trainees = []
    for s in group:
        cfg = s.cfg
        seed_everything(cfg.seed)
        model = create_model(cfg.model, num_classes, ts.input_shape, **cfg.model_kwargs)
        check_output_classes(model, rows.inputs[:2], num_classes, f"student {cfg.model}")
        teacher = None
        if s.uses_teacher:
            teacher = _teacher_fn(targets, cfg.combine, cfg.temperature)
        # What a resumed run must share with the one that wrote the checkpoint.
        identity = {k: v for k, v in as_dict(cfg).items() if k != "device"}
        identity["data"] = data
        identity["cache_data_fingerprint"] = (attrs.get("data") or {}).get("fingerprint")
        trainees.append(
            Trainee(
                s.name,
                model,
                bind_loss(cfg.loss, cfg.temperature, s.weights),
                optim(cfg),
                teacher=teacher,
                checkpoint=s.resume_path,
                identity=identity,
            )
        )
    desc = f"train-student {group[0].name}" if len(group) == 1 else f"{len(group)} students"
    fit_many(
        trainees,
        rows,
        epochs=first.epochs,
        batch_size=first.batch_size,
        seed=first.seed,
        device=device,
        desc=desc,
        resume=resume,
    )
    for s, t in zip(group, trainees, strict=True):
        _write(s, t, ts, labels, attrs, data, cache, targets, overwrite)
        t.discard_checkpoint()


def _teacher_fn(targets: Targets, method: str, temperature: float):
    return lambda batch: targets.teacher(batch, method, temperature)


def _write(
    s: Student,
    trainee: Trainee,
    ts: TransferSet,
    labels: np.ndarray,
    attrs: dict[str, Any],
    data: str,
    cache: Path,
    targets: Targets | None,
    overwrite: bool,
) -> None:
    """The student directory: checkpoint (weights + info), student.json, train_log.csv."""
    cfg = s.cfg
    info = {
        "role": "student",
        "name": s.name,
        "preset": s.preset,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "num_classes": int(attrs["num_classes"]),
        "class_names": attrs.get("class_names"),
        "input_shape": list(ts.input_shape),
        "num_params": count_parameters(trainee.model),
        "loss_weights": s.weights,
        "config": as_dict(cfg),
        "data": {"spec": data, "num_labelled": int((labels >= 0).sum()), "num_rows": len(ts)},
        "cache": {
            "path": str(cache),
            "teacher": attrs.get("teacher"),
            "data": attrs.get("data"),
            "read": None if targets is None or not s.uses_teacher else targets.mode,
        },
        "final": trainee.log[-1],
    }
    with atomic_output(s.out, overwrite) as tmp:
        tmp.mkdir(parents=True)
        save_checkpoint(tmp / CHECKPOINT, trainee.model.cpu(), info)
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        with open(tmp / LOG, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(trainee.log[0]))
            writer.writeheader()
            writer.writerows(trainee.log)
