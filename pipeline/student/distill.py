"""Training students against cached teacher targets; the teacher is never loaded.

`train` loads the transfer set and the cache once, then trains every student. Students that
share a data pipeline (epochs, batch size, seed, labelled fraction, device, threads) train in
lockstep on the same batches, each ending with the weights it would have had alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.layout import cache_identity
from pipeline.cache.store import location
from pipeline.core import distributed
from pipeline.core.device import choose_threads, forward_flops, resolve_device, seed_everything
from pipeline.core.distributed import Ranks, from_env, stop
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import OutputLock, check_not_input, check_writable, data_path, remove
from pipeline.core.runrecord import write_record
from pipeline.core.training import TrainData, Trainee, check_output_classes, fit_many
from pipeline.data import TransferSet, holdout_mask, load_transfer_set, mask_labels
from pipeline.data.views import Views, apply_views
from pipeline.models import count_parameters, create_model
from pipeline.student.checks import (
    check_cache,
    check_targets_for_loss,
    sample_record,
    targets_record,
)
from pipeline.student.feature_training import FeatureTerms, add_projections, bind_terms
from pipeline.student.livelog import LiveLog, clear_stale
from pipeline.student.students import (
    CHECKPOINT,
    Student,
    TrainStudentConfig,
    teacher_fingerprint,
    write_student,
)
from pipeline.student.targets import Targets, open_targets, parse_size, plan_views

Attrs = dict[str, Any]  # the cache's attributes


def train(
    students: list[Student],
    cache: Path,
    data: str,
    overwrite: bool = False,
    resume: bool = False,
    out_option: str = "--out",
    ranks: Ranks | None = None,
) -> list[Path]:
    """Train `students` from one loaded transfer set and cache; returns their directories.

    Every student's output is locked for the whole run; `out_option` names the option the
    outputs came from, in errors. Under torchrun (`ranks`, default: from the environment)
    every rank trains its share of each batch and rank 0 alone checks, locks and writes the
    outputs (pipeline.core.distributed); `SINGLE` trains them as one process, whatever torchrun
    says."""
    for s in students:
        s.check()
    check_outputs(students, cache, data, out_option)
    ranks = from_env() if ranks is None else ranks
    with ExitStack() as locks:
        locks.callback(stop, ranks)
        for s in students if ranks.main else ():
            locks.enter_context(OutputLock(s.out))
            check_writable(s.out, overwrite)
            check_resume(s, overwrite, resume)
            clear_stale(s.live_path)
            if resume and not s.resume_path.exists():  # said, not silently started afresh
                print(
                    f"note: --resume: no {s.resume_path}, so {s.out} trains from epoch 1",
                    file=sys.stderr,
                )
        ts = load_transfer_set(data)
        targets, attrs = _open(students, location(cache), ts)
        groups: dict[tuple, list[Student]] = {}
        for s in students:
            groups.setdefault(s.pipeline_key(), []).append(s)
        for group in groups.values():
            try:
                trainees, labels = _train_group(group, ts, targets, attrs, data, resume, ranks)
            except BaseException:
                _drop_live_logs(group, ranks)
                raise
            for s, t in zip(group, trainees, strict=True) if ranks.main else ():
                info = student_info(s, t, ts, labels, attrs, data, location(cache), targets)
                write_student(s.out, t.model, info, s.live_path, overwrite, s.resume_path)
                write_record(s.out, run_facts(s, ranks), identity=s.out / CHECKPOINT)
                t.discard_checkpoint()
        distributed.barrier(ranks)  # every rank returns once rank 0 has written
    return [s.out for s in students]


def _drop_live_logs(group: list[Student], ranks: Ranks) -> None:
    """After a failed run, remove the DVCLive directories that no resume checkpoint backs:
    a student that was never written leaves nothing behind (an interrupted one keeps its
    curves until --resume replays them from the checkpoint)."""
    for s in group if ranks.main else ():
        if not s.resume_path.exists():
            remove(s.live_path)


def check_outputs(students: list[Student], cache: Path, data: str, out_option: str) -> None:
    """Refuse two students on one directory, and any output (or the files written beside it:
    resume checkpoint, lock) that is, contains or lies inside the cache or the data."""
    outs = [str(s.out.resolve()) for s in students]
    if len(set(outs)) != len(outs):
        raise PipelineError(f"two students would write the same directory: {sorted(outs)}")
    inputs = {"--cache": location(cache), "--data": data_path(data)}
    for s in students:
        check_not_input(s.out, inputs, out_option)
        beside = {
            "resume checkpoint": s.resume_path,
            "training log": s.live_path,
            "lock file": OutputLock(s.out).path,
        }
        for what, path in beside.items():
            check_not_input(path, inputs, f"{out_option} {s.out}: its {what}")


def check_resume(s: Student, overwrite: bool, resume: bool) -> None:
    """The resume checkpoint of an interrupted run is continued only with --resume: without
    it, --overwrite discards it, and otherwise it is refused rather than silently lost."""
    path = s.resume_path
    if resume or not (path.exists() or path.is_symlink()):
        return
    if overwrite:
        remove(path)
        return
    raise PipelineError(
        f"{path} holds an interrupted run of {s.out} ({_epochs_done(path)}): "
        "--resume continues it, --overwrite discards it and starts afresh"
    )


def _epochs_done(path: Path) -> str:
    """How far the resume checkpoint at `path` got, for the refusal."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return f"{int(state['epochs_done'])} epochs done"
    except Exception:  # a torn or foreign file: the refusal still stands
        return "unreadable: --resume will say why"


def _open(students: list[Student], cache: Path, ts: TransferSet) -> tuple[Targets | None, Attrs]:
    """One read of the cache for every student (only its checks when none needs a teacher)."""
    # The fingerprint check is skipped only if every student asked for cross-modal joining.
    cross_modal = all(s.cfg.cross_modal for s in students)
    readers = [s for s in students if s.uses_teacher]
    for s in students:
        if s.cfg.feature_losses and not s.uses_teacher:
            raise PipelineError(
                f"{s.name}: feature losses need the teacher's targets, and loss "
                f"{s.cfg.loss} ignores the teacher"
            )
    if not readers:
        return None, check_cache(cache, ts, cross_modal)
    terms = [t for s in readers for t in s.terms]
    targets, attrs = open_targets(
        cache,
        ts,
        cross_modal=cross_modal,
        combine=tuple(sorted({s.cfg.combine for s in readers})),
        budget=min(parse_size(s.cfg.cache_memory) for s in readers),
        features=tuple(sorted({t.feature for t in terms})),
        check=lambda attrs: _check_losses(readers, attrs),
    )
    add_projections(terms, targets, attrs, ts.sample_ids, str(cache))
    return targets, attrs


def _check_losses(readers: list[Student], attrs: Attrs) -> None:
    """Sparse targets: refuse, before any is read, a student whose loss (or temperature, or
    feature loss) cannot train from them, in one line naming it."""
    for s in readers:
        temperature = s.cfg.temperature if s.loss.uses_temperature else None
        where = s.cfg.source("temperature")  # the bare key when left at its default
        where = "--temperature" if where == "temperature" else where
        check_targets_for_loss(attrs, s.cfg.loss, temperature, where)
        if sample_record(attrs) is not None and any(t.loss == "grad-at" for t in s.terms):
            raise PipelineError(
                f"{s.name}: feature loss grad-at takes the teacher's top class from its "
                "logits, which sampled targets do not keep (precompute with --topk K)"
            )


def _train_group(
    group: list[Student],
    ts: TransferSet,
    targets: Targets | None,
    attrs: Attrs,
    data: str,
    resume: bool,
    ranks: Ranks,
) -> tuple[list[Trainee], np.ndarray]:
    """Train students that share a data pipeline in lockstep; returns their trainees and
    the labels they saw (-1 where masked)."""
    first = group[0].cfg
    held = holdout_mask(ts.labels, first.holdout, first.seed)  # (N,) never trained on
    labels = mask_labels(np.where(held, -1, ts.labels), first.labeled_fraction, first.seed)
    served, augment = _with_views(first, targets, attrs, ts.sample_ids)
    rows = _rows(group, ts, labels, held, served, augment, data)
    fingerprint = (attrs.get("data") or {}).get("fingerprint")
    features, classes = attrs.get("features") or {}, int(attrs["num_classes"])
    cache = cache_identity(attrs)  # a resumed run must read this very cache
    trainees = [
        _trainee(s, rows, targets, classes, ts, data, fingerprint, features, cache) for s in group
    ]
    flops = max(forward_flops(t.model, rows.inputs) for t in trainees)
    threads = choose_threads(flops, first.threads)
    torch.set_num_threads(threads)
    for s in group:
        s.threads_used, s.heldout_rows = threads, int(held.sum())
        s.group_size, s.resumed = len(group), resume and s.resume_path.exists()
    start = time.perf_counter()
    fit_many(
        trainees,
        rows,
        epochs=first.epochs,
        batch_size=first.batch_size,
        seed=first.seed,
        device=distributed.start(ranks, resolve_device(first.device)),
        desc=f"train-student {group[0].name}" if len(group) == 1 else f"{len(group)} students",
        resume=resume,
        ranks=ranks,
    )
    for s in group:  # lockstep students share the wall time
        s.train_seconds = time.perf_counter() - start
    return trainees, labels


def _rows(
    group: list[Student],
    ts: TransferSet,
    labels: np.ndarray,
    held: np.ndarray,
    targets: Targets | None,
    augment: Callable | None,
    data: str,
) -> TrainData:
    """The rows the group trains on: every row not held out, with its targets, or the
    labelled rows alone for losses that ignore the teacher (the CE baseline)."""
    heldout = None
    if held.any():
        heldout = (torch.from_numpy(ts.inputs[held]), torch.from_numpy(ts.labels[held]))
    if not group[0].uses_teacher:
        keep = labels >= 0
        if not keep.any():
            loss = group[0].cfg.loss
            raise PipelineError(f"loss {loss!r} needs labels, and --data {data} has none")
        inputs, kept = torch.from_numpy(ts.inputs[keep]), torch.from_numpy(labels[keep])
        return TrainData(inputs, kept, heldout=heldout)
    for s in group:
        if s.needs_labels and not (labels >= 0).any():
            raise PipelineError(
                f"--data {data} has no labels: loss {s.cfg.loss} with "
                f"{s.cfg.loss_settings} needs some (use --alpha 1, or --loss soft)"
            )
    if heldout is None:
        inputs, kept = torch.from_numpy(ts.inputs), torch.from_numpy(labels)
        return TrainData(inputs, kept, targets, augment=augment)
    train = np.flatnonzero(~held)
    if len(train) == 0:
        raise PipelineError(f"holdout {group[0].cfg.holdout} leaves no rows of {data} to train on")
    inputs, kept = torch.from_numpy(ts.inputs[train]), torch.from_numpy(labels[train])
    return TrainData(inputs, kept, targets.restrict(train), heldout, augment)


def _with_views(
    cfg: TrainStudentConfig, targets: Targets | None, attrs: Attrs, sample_ids: np.ndarray
) -> tuple[Targets | None, Callable | None]:
    """The targets served view by view (epoch e: view (e + offset) mod `cfg.views` of each
    sample), and the function regenerating a batch's inputs from its views' seeds; the
    targets as they are, and None, for a cache of one raw view."""
    views = Views.from_attrs(attrs)
    count = cfg.views or views.count
    if count > views.count:
        raise PipelineError(
            f"{cfg.source('views')} {count}: the cache holds {views.count} view(s) per sample"
        )
    if targets is None or (count == 1 and not views.spec):
        return targets, None
    plan = plan_views(count, sample_ids, cfg.seed)  # targets' rows are the data's rows
    augment = (lambda x, seeds: apply_views(x, seeds, views.spec)) if views.spec else None
    return targets.with_plan(plan), augment


def _trainee(
    s: Student,
    rows: TrainData,
    targets: Targets | None,
    num_classes: int,
    ts: TransferSet,
    data: str,
    fingerprint: str | None,
    features: dict[str, Any],
    cache: str | None = None,
) -> Trainee:
    """A freshly seeded model for student `s`, its bound loss and its teacher targets."""
    cfg = s.cfg
    seed_everything(cfg.seed)
    what = cfg.source("model")
    model = create_model(cfg.model, num_classes, ts.input_shape, what=what, **cfg.model_kwargs)
    check_output_classes(model, rows.inputs[:2], num_classes, f"student {cfg.model}")
    terms = None
    if s.terms:
        bound = bind_terms(s.terms, features, model, rows.inputs[:2], f"student {cfg.model}")
        terms = FeatureTerms(*bound)
    teacher, form = None, "logits"
    if s.uses_teacher:
        combine, temperature = cfg.combine, cfg.temperature
        teacher = lambda batch: targets.teacher(batch, combine, temperature)  # noqa: E731
        form = targets.form  # sampled targets give the target distribution itself
    return Trainee(
        s.name,
        model,
        s.loss.bind(cfg.temperature, cfg.loss_settings, form),
        cfg,
        teacher=teacher,
        checkpoint=s.resume_path,
        identity=s.identity(data, fingerprint, cache),
        live=lambda rows: LiveLog(s.live_path, rows),
        terms=terms,
    )


def run_facts(s: Student, ranks: Ranks) -> dict[str, Any]:
    """What the run of student `s` measured (its run record; never in the student itself,
    whose bytes are a function of its inputs). Students of one lockstep group share the
    wall time; a resumed run's time is that of the part it ran."""
    return {
        "command": "train-student",
        "seconds": round(s.train_seconds, 3),
        "seconds_shared_by": s.group_size,
        "resumed": s.resumed,
        "threads": s.threads_used,
        "ranks": ranks.world,
    }


def student_info(
    s: Student,
    trainee: Trainee,
    ts: TransferSet,
    labels: np.ndarray,
    attrs: Attrs,
    data: str,
    cache: Path,
    targets: Targets | None,
) -> dict[str, Any]:
    """The metadata saved in the checkpoint and student.json: how to rebuild the model, the
    resolved config, and where its targets came from."""
    from pipeline.core.config import as_dict

    cfg = s.cfg
    return {
        "role": "student",
        "name": s.name,
        "preset": s.preset,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "num_classes": int(attrs["num_classes"]),
        "class_names": attrs.get("class_names"),
        "input_shape": list(ts.input_shape),
        "num_params": count_parameters(trainee.model),
        "loss_settings": cfg.loss_settings,
        "code": s.origins(),
        "config": as_dict(cfg),
        "data": {"spec": data, "num_labelled": int((labels >= 0).sum()), "num_rows": len(ts)},
        "cache": {
            "path": str(cache),
            "teacher": attrs.get("teacher"),
            "teacher_fingerprint": teacher_fingerprint(attrs),
            "data": attrs.get("data"),
            "views": {"count": int(attrs.get("num_views", 1)), **(attrs.get("views") or {})},
            "read": None if targets is None or not s.uses_teacher else targets.mode,
            "targets": targets_record(attrs),  # logits, or top-k / sampled with their K
        },
        "heldout_rows": s.heldout_rows,
        "final": trainee.log[-1],
        "log": trainee.log,
    }
