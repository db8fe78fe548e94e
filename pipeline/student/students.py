"""Students: what one student is (`Student`), and the directory train-student writes for it,
which evaluate and export read.

A student directory holds `student.pt` (weights and everything needed to rebuild the model),
`student.json` (the same metadata and the per-epoch log, readable without torch) and
`dvclive/` (the per-epoch metrics in DVCLive's format, for `dvc plots` and VS Code).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import (
    AT_LEAST_0,
    RESOLVED,
    SEED,
    OptimConfig,
    as_dict,
    choice,
    require,
    require_model,
    resolve,
    section,
)
from pipeline.core.errors import PipelineError
from pipeline.core.fsutil import atomic_output, json_text

CHECKPOINT = "student.pt"  # weights + everything needed to rebuild the model
INFO = "student.json"  # the checkpoint's metadata, readable without torch
LIVE = "dvclive"  # per-epoch metrics in DVCLive's format (pipeline.student.livelog)


def checkpoint_of(student: Path) -> Path:
    """The checkpoint inside a student directory written by train-student."""
    student = Path(student)
    if student.is_file() and student.name == CHECKPOINT:
        return student  # the checkpoint itself, named where its directory was expected
    ckpt = student / CHECKPOINT
    if not ckpt.is_file():
        what = "does not exist" if not student.exists() else f"has no {CHECKPOINT} in it"
        raise PipelineError(f"--student {student}: {what} (a train-student output directory?)")
    return ckpt


@dataclass
class TrainStudentConfig(OptimConfig):
    """`train_student` section (shared by all students), overlaid by `students.<name>`, then
    by `losses.<loss>`. The loss's own settings (alpha, beta, ...) are declared by the loss
    (`pipeline losses`) and resolved into `loss_settings`."""

    model: str = "mlp"  # a registry model, or package.module:function
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "kd"  # a registered loss (`pipeline losses`), or package.module:function
    temperature: float = 4.0
    # Filled from losses.<loss> and --loss-arg/--alpha/...; empty means the loss's defaults.
    loss_settings: dict[str, float] = field(default_factory=dict, metadata=RESOLVED)
    combine: str = "mean-logits"  # members of an ensemble cache: mean-logits | mean-probs at T
    labeled_fraction: float = 1.0
    # Labelled rows never trained on, to measure each epoch (held-out accuracy); 0: none.
    holdout: float = 0.1
    # Views of an augmented cache to train on, the first N (0: all): epoch e trains each
    # sample on view (e + offset) mod N, its input regenerated from the view's stored seed.
    views: int = field(default=0, metadata=AT_LEAST_0)
    # Feature losses added to the logit loss, each LOSS:FEATURE[=LAYER[+LAYER2]][:KEY=VALUE,..]
    # (pipeline/student/feature_training.py), e.g. "at:att3=layers.1"; the cache holds FEATURE.
    feature_losses: list[str] = field(default_factory=list)
    cross_modal: bool = False  # join to the cache by sample ids alone (no fingerprint check)
    cache_memory: int | str = "2GiB"  # targets up to this size in memory, else streamed
    seed: int = field(default=0, metadata=SEED)
    device: str = "auto"

    OPTIONS: typing.ClassVar[dict[str, str]] = {  # key → its CLI option
        "model": "--student",
        "feature_losses": "--feature-loss",
    }
    UNKNOWN_KEY_HINT: typing.ClassVar[str] = (
        "; a loss's settings (alpha, beta, ...) go in losses.LOSS or --loss-arg"
    )

    def validate(self) -> None:
        from pipeline.cache.ensemble import COMBINE_METHODS
        from pipeline.student.losses import get_loss
        from pipeline.student.targets import parse_size
        from pipeline.student.token_losses import TOKEN_LOSSES, token_settings

        super().validate()
        require(self, "temperature", self.temperature > 0, "> 0")
        require(self, "labeled_fraction", 0 <= self.labeled_fraction <= 1, "in [0, 1]")
        require(self, "holdout", 0 <= self.holdout < 1, "in [0, 1)")
        choice(self, "combine", COMBINE_METHODS)
        require_model(self)
        parse_size(self.cache_memory, self.source("cache_memory"))
        if self.feature_losses:
            from pipeline.student.feature_training import parse_terms

            parse_terms(self.feature_losses, self.source("feature_losses"))
        given = [(self.source(f"loss_settings.{k}"), k, v) for k, v in self.loss_settings.items()]
        if self.loss in TOKEN_LOSSES:  # a language model's (sequence --data)
            self.loss_settings = token_settings(self.loss, given)
            return
        try:
            loss = get_loss(self.loss)
        except PipelineError as e:  # name where the unknown loss came from
            raise PipelineError(f"{self.source('loss')}: {e}") from None
        self.loss_settings = loss.resolve(given)


LossArg = tuple[str, str, Any]  # (where, setting, value): ("--alpha", "alpha", 0.5)


def resolve_student(
    values: dict[str, Any],
    params: str | None,
    preset: str | None,
    cli: dict[str, Any],
    loss_args: list[LossArg] = (),
    sequences: bool = False,
) -> TrainStudentConfig:
    """TrainStudentConfig: defaults → train_student → students.PRESET → losses.LOSS → options,
    from `values` (the params file `params`, already loaded). `losses.LOSS` holds the loss's
    settings (checked against its declaration) and may override training keys (the CE
    baseline's epochs); `loss_args` are the command line's loss settings, applied last. With a
    params file, a preset missing from its `students` is an error. For `sequences` (a language
    model's data) the defaults are the token ones (`pipeline.student.lm.for_sequences`), so
    settings are checked against the loss that trains."""
    where = params or "params.yaml"
    layers = [(f"{where}:train_student", section(values, "train_student", where))]
    if preset is not None and params is None:
        raise PipelineError(f"--name {preset}: needs --params, the file with students.{preset}")
    if preset is not None:
        students = section(values, "students", where)
        if preset not in students:
            raise PipelineError(
                f"--name {preset}: no students.{preset} in {where} "
                f"(have: {', '.join(students) or 'none'})"
            )
        layers.append((f"{where}:students.{preset}", section(students, preset, where)))
    loss = resolve(TrainStudentConfig, *layers, ("command line", cli), validate=False).loss
    training, settings = _split_loss_entry(values, where, loss)
    cfg = resolve(
        TrainStudentConfig,
        *layers,
        (f"{where}:losses.{loss}", training),
        ("command line", cli),
        validate=False,
    )
    for name, key, value in [*settings, *loss_args]:
        cfg.loss_settings[key] = value
        cfg._sources[f"loss_settings.{key}"] = name
    if sequences:
        from pipeline.student.lm import for_sequences

        cfg = for_sequences(cfg)
    cfg.validate()
    return cfg


def _split_loss_entry(
    values: dict[str, Any], where: str, loss: str
) -> tuple[dict[str, Any], list[LossArg]]:
    """`losses.LOSS` of the params: (training keys, the loss's settings). Every entry of the
    section is checked, not only the one in use, so a misspelt loss or setting is an error
    the first time the file is read."""
    from pipeline.student.losses import get_loss
    from pipeline.student.token_losses import TOKEN_LOSSES, token_settings

    entries = section(values, "losses", where)
    training_keys = {f.name for f in dataclasses.fields(TrainStudentConfig)}
    training_keys -= {"loss_settings", "loss"}  # `loss` inside losses.X would contradict X
    split = {}
    for name in entries:
        entry = section(entries, name, f"{where}:losses")
        token = str(name) in TOKEN_LOSSES  # a language model's loss (sequence --data)
        spec = None if token else get_loss(str(name))
        own = ("alpha", "beta") if token else spec.settings
        training = {k: v for k, v in entry.items() if k in training_keys and k not in own}
        settings = [
            (f"{where}:losses.{name}.{k}", k, v) for k, v in entry.items() if k not in training
        ]
        # Unknown or out-of-range settings fail here, naming the key.
        if token:
            token_settings(str(name), settings)
        else:
            spec.resolve(settings)
        split[name] = (training, settings)
    return split.get(loss, ({}, []))


@dataclass
class Student:
    """One student to train: its resolved config and output directory."""

    cfg: TrainStudentConfig
    out: Path
    preset: str | None = None  # the students.<preset> entry it came from, if any
    threads_used: int = 0  # CPU threads it trained on (chosen when cfg.threads is 0)
    group_size: int = 1  # students trained in lockstep with it, itself included
    resumed: bool = False  # continued from a resume checkpoint
    train_seconds: float = 0.0  # wall time of its training (shared by a lockstep group)
    heldout_rows: int = 0  # rows held out of training and measured each epoch

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def loss(self):  # -> LossSpec (torch is imported lazily)
        from pipeline.student.losses import get_loss

        return get_loss(self.cfg.loss)

    @property
    def uses_teacher(self) -> bool:
        return self.loss.uses_teacher

    @property
    def needs_labels(self) -> bool:
        return self.loss.needs_labels(self.cfg.loss_settings)

    @property
    def resume_path(self) -> Path:
        """Per-epoch checkpoint beside the output; removed once the output is written."""
        return self.out.with_name(self.out.name + ".resume.pt")

    @property
    def terms(self) -> list:  # -> list[FeatureTerm]
        from pipeline.student.feature_training import parse_terms

        return parse_terms(self.cfg.feature_losses, self.cfg.source("feature_losses"))

    @property
    def live_path(self) -> Path:
        """DVCLive directory while training, beside the output; moved into it at the end."""
        return self.out.with_name(self.out.name + ".dvclive")

    def check(self) -> None:
        """Reject impossible settings before any data is read (and fill the loss's defaults)."""
        self.cfg.validate()

    def pipeline_key(self) -> tuple:
        """Students with equal keys can train on the same batches."""
        c = self.cfg
        return (
            c.epochs,
            c.batch_size,
            c.seed,
            c.labeled_fraction,
            c.holdout,
            c.views,
            c.device,
            c.threads,
            self.uses_teacher,
        )

    def identity(self, data: str, fingerprint: str | None, cache: str | None) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the resume checkpoint: the
        settings, the data and the very cache (`cache`: its identity)."""
        identity = {k: v for k, v in as_dict(self.cfg).items() if k != "device"}
        return {**identity, "data": data, "cache_data_fingerprint": fingerprint, "cache": cache}

    def origins(self) -> dict[str, Any]:
        """Provenance of user code this student was built with (model factory, loss)."""
        from pipeline.models import model_origin

        return {"model": model_origin(self.cfg.model), "loss": self.loss.origin}


def _member_digest(member: dict[str, Any]) -> str | list[str]:
    """A member's file digests: its one file's sha256 (as before `files`), or all of them."""
    files = sorted((member.get("files") or {}).values())
    return files if len(files) > 1 else member.get("sha256") or ""


def teacher_fingerprint(attrs: dict[str, Any]) -> str | None:
    """Which teacher (or ensemble) made a cache: a digest of its members' sha256 in order.
    A student records its train cache's; evaluate compares it with the test cache's."""
    import hashlib

    members = (attrs.get("teacher") or {}).get("members") or []
    # Every file each member's outputs depend on (caches before `files`: its sha256 alone).
    digests = [_member_digest(m) for m in members]
    if not any(digests):
        return None
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]


def write_student(
    out: Path,
    model: Any,
    info: dict[str, Any],
    live: Path | None,
    overwrite: bool,
    resume: Path | None = None,
) -> Path:
    """The student directory at `out`: checkpoint (weights + info), student.json and the
    DVCLive directory `live` (moved in). Written beside `out` and moved into place when
    complete; then `live` and the resume checkpoint `resume` are removed."""
    import shutil

    from pipeline.models.checkpoint import save_checkpoint
    from pipeline.student.livelog import MARKER

    side = tuple(p for p in (live, resume) if p is not None)
    with atomic_output(out, overwrite, then=side) as tmp:  # the side files go once it is in place
        tmp.mkdir(parents=True)
        save_checkpoint(tmp / CHECKPOINT, model.cpu(), info)
        (tmp / INFO).write_text(json_text(info))
        if live is not None and live.is_dir():
            shutil.copytree(live, tmp / LIVE, ignore=shutil.ignore_patterns(MARKER))
    return out
