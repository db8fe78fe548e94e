"""The one training loop, shared by teachers (labels only) and students (labels + targets).

Several models can train in lockstep on one data pipeline (`fit_many`): each batch is read
once and given to every model in turn. Each model keeps its own optimizer, learning-rate
schedule and random-number state, so a model trained beside others ends with the same weights
as one trained alone. After every epoch a model's full state can be saved, and an interrupted
run resumed from it ends identical to an uninterrupted one (the data order of an epoch is a
function of the seed and the epoch number alone).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.core.config import OptimConfig
from pipeline.core.device import epoch_rng
from pipeline.core.distributed import SINGLE, Ranks, all_sum, barrier, broadcast_bytes
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.fsutil import atomic_output, remove
from pipeline.core.progress import progress

MEASURE_BATCH = 1024  # rows per forward call when held-out rows are measured

if TYPE_CHECKING:  # types only: teachers train without the cache and loss modules
    from pipeline.student.losses import LossOnBatch
    from pipeline.student.targets import TargetBatch, Targets

RESUME_FORMAT = "kd-pipeline-resume"
# Test hook (tests/test_distributed.py): "K" or "K:R": rank R (default 0) SIGKILLs
# itself once every rank has finished epoch K (1-based) and its checkpoint is written.
KILL_AFTER_EPOCH_ENV = "KD_PIPELINE_TEST_KILL_AFTER_EPOCH"


def make_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def lr_at(optim: OptimConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate of optimizer step `step` (0-based, counted over the whole run)."""
    if optim.schedule == "cosine":
        return optim.lr * 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
    if optim.schedule == "step":
        epoch = step // steps_per_epoch
        milestones = optim.milestones or [epochs // 2, (3 * epochs) // 4]
        return optim.lr * optim.lr_decay ** sum(epoch >= m for m in milestones if m > 0)
    return optim.lr


@dataclass
class TrainData:
    """Rows to train on: inputs (N, ...), labels (N,), and teacher targets of the same N rows
    (or None for labels-only training); `heldout`: rows never trained on, (inputs (H, ...),
    labels (H,)), measured after every epoch. `augment(x, seeds)`: regenerates each batch's
    inputs from the seeds of the views its targets come from, so the student sees exactly
    what the teacher saw (`pipeline.data.views.apply_views`)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    targets: Targets | None = None
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None
    augment: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.targets is not None and self.targets.num_rows != len(self.labels):
            raise PipelineError(
                f"{self.targets.num_rows} target rows for {len(self.labels)} training rows"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, TargetBatch | None]]:
        """(inputs, labels, targets) of every row once, in the seeded order of `epoch`."""
        if self.targets is None:
            order = epoch_rng(seed, epoch).permutation(len(self))
            chunks = ((order[s : s + batch_size], None) for s in range(0, len(self), batch_size))
        else:
            chunks = self.targets.epoch(epoch, batch_size, seed)
        for rows, targets in chunks:
            idx = torch.from_numpy(rows)
            x = self.inputs[idx]
            if self.augment is not None:
                if targets is None or targets.seeds is None:  # never the raw inputs silently
                    raise PipelineError("augmented views without their seeds: a broken cache?")
                x = torch.from_numpy(self.augment(x.numpy(), targets.seeds))
            yield x, self.labels[idx], targets


TeacherOnBatch = Callable[["TargetBatch"], torch.Tensor]


class FeatureSide(Protocol):
    """Feature losses of a trainee (pipeline.student.feature_training.FeatureTerms)."""

    modules: nn.ModuleList  # trained beside the model (FitNets regressors)
    derivative: bool  # inputs must require grad (input-gradient matching)
    pretrain: int  # epochs of pre-training terms alone

    def value(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        batch: Any,
        labels: torch.Tensor,
        epoch: int,
        pretraining: bool,
    ) -> torch.Tensor: ...

    def sync_grads(self, ranks: Ranks) -> None: ...


class EpochLog(Protocol):
    """Where a trainee's rows go after each epoch (pipeline.student.livelog.LiveLog: DVCLive)."""

    def log(self, row: dict[str, float]) -> None: ...


class Trainee:
    """One model in training: loss, optimizer, schedule, random state, log and checkpoint.

    Create it right after creating the model: it takes over the random state from there, so
    the model's dropout draws do not depend on what else trains beside it.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss_fn: LossOnBatch,
        optim: OptimConfig,
        *,
        teacher: TeacherOnBatch | None = None,
        checkpoint: Path | None = None,
        identity: dict[str, Any] | None = None,
        live: Callable[[list[dict[str, float]]], EpochLog] | None = None,
        terms: FeatureSide | None = None,
    ):
        self.name, self.model, self.loss_fn, self.optim = name, model, loss_fn, optim
        self.terms = terms  # feature losses added to the logit loss, or None
        self.teacher = teacher  # batch → teacher logits (B, C); None: labels only
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.identity = identity or {}  # what a resumed run must match (the config)
        self.open_log = live  # epochs done → a per-epoch log (DVCLive), or None
        self.live: EpochLog | None = None
        self.rng = torch.get_rng_state()
        self.cuda_rng: torch.Tensor | None = None
        self.log: list[dict[str, float]] = []
        self.epochs_done = 0
        self.steps_done = 0
        self.resumed = False  # continued from its checkpoint (`restore`)
        self.opt: torch.optim.Optimizer | None = None
        self.net: nn.Module = model  # what steps call: the model, or its DDP wrapper
        self.ranks = SINGLE

    def setup(self, device: torch.device, ranks: Ranks = SINGLE) -> None:
        self.model.to(device)
        extra = self.terms.modules if self.terms is not None else nn.ModuleList()
        extra.to(device)
        self.ranks = ranks
        if ranks.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.opt = make_optimizer(self.optim, [*self.model.parameters(), *extra.parameters()])
        self.scaler = None  # fp16 only: scales the loss so small gradients survive
        if self.optim.precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        if device.type == "cuda" and self.cuda_rng is None:
            self.cuda_rng = torch.cuda.get_rng_state(device)

    def begin_epoch(self, device: torch.device) -> None:
        self.model.train()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self._loss, self._correct, self._seen = zero.clone(), zero.clone(), 0
        self._step_losses: list[torch.Tensor] = []  # on the device: no sync per step

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: TargetBatch | None,
        steps_per_epoch: int,
        epochs: int,
        share: float = 1.0,
    ) -> None:
        """One optimizer step on batch (x, y) with this model's own random state. `share`:
        this rank's rows over the global batch's, times the ranks (1 when single), so the
        ranks' averaged gradient is the global batch's."""
        self._swap_rng_in(x.device)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.optim, self.steps_done, steps_per_epoch, epochs)
        t = None
        if self.teacher is not None and targets is not None:
            t = self.teacher(targets).to(x.device, non_blocking=True)
        if self.terms is not None and self.terms.derivative:
            x = x.detach().requires_grad_(True)  # the student's input gradients are matched
        with _autocast(self.optim.precision, x.device):
            out = self.net(x)
            loss = self._loss_of(out, t, y, x, targets)
        self.opt.zero_grad(set_to_none=True)
        scaled = loss * share if share != 1.0 else loss
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        if self.terms is not None and self.ranks.active:
            self.terms.sync_grads(self.ranks)
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()
        self.steps_done += 1
        self._swap_rng_out(x.device)
        if share == 0.0:  # a stand-in row for a rank with none: nothing to count
            return
        with torch.no_grad():  # accumulated on the device: no sync per step
            known = y >= 0
            self._loss += loss.detach() * len(y)
            self._step_losses.append(loss.detach())
            self._correct += (out.argmax(1)[known] == y[known]).sum()
        self._seen += len(y)

    def _loss_of(self, out, t, y, x, targets) -> torch.Tensor:
        """The logit loss plus the feature terms; only the pre-training terms while any
        term's pre-training epochs last."""
        if self.terms is None:
            return self._logit_loss(out, t, y)
        epoch = self.epochs_done
        pre = epoch < self.terms.pretrain
        total = torch.zeros((), device=out.device) if pre else self._logit_loss(out, t, y)
        return total + self.terms.value(x, out, targets, y, epoch, pretraining=pre)

    def _logit_loss(self, out, t, y) -> torch.Tensor:
        """The logit loss; one that reads the epoch (`reads_epoch`:
        pipeline.student.losses.EpochLoss, dkd's warm-up) gets the 0-based epoch, which a resumed
        run restores with the rest."""
        if getattr(self.loss_fn, "reads_epoch", False):
            return self.loss_fn(out, t, y, epoch=self.epochs_done)
        return self.loss_fn(out, t, y)

    def end_epoch(self, labelled: int) -> dict[str, float]:
        """Close the epoch's log row; `labelled`: labelled rows seen in an epoch (by every
        rank together)."""
        seen = torch.tensor(float(self._seen), dtype=torch.float64, device=self._loss.device)
        self._loss, self._correct, seen = all_sum(self.ranks, self._loss, self._correct, seen)
        self._seen = int(seen)
        loss = float(self._loss) / max(1, self._seen)
        self._check_finite(loss)
        row = {
            "epoch": self.epochs_done + 1,
            "loss": loss,
            "train_accuracy": float(self._correct) / labelled if labelled else float("nan"),
            "lr": self.opt.param_groups[0]["lr"],
        }
        self.log.append(row)
        self.epochs_done += 1
        return row

    def close_epoch(self, row: dict[str, float], step_losses: list[torch.Tensor]) -> None:
        """Record an epoch trained by a loop of its own (`pipeline.core.lm`) rather than by
        `step`: refuse a non-finite one, log it, count it, write the resume checkpoint and
        the live row, as `fit_many` does after `end_epoch`."""
        self._step_losses = step_losses
        self._check_finite(row["loss"])
        self.log.append(row)
        self.epochs_done += 1
        self.save()
        if self.live is not None:
            self.live.log(row)

    def measure(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Held-out loss (cross-entropy) and accuracy of the model as it is now, in eval mode
        (no random numbers drawn, no state changed).  # inputs (H, ...), labels (H,)"""
        self.model.eval()
        device = next(self.model.parameters()).device
        loss = correct = 0.0
        with torch.no_grad():
            for start in range(0, len(labels), MEASURE_BATCH):
                x = inputs[start : start + MEASURE_BATCH].to(device)
                y = labels[start : start + MEASURE_BATCH].to(device)
                out = self.model(x).float()
                loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                correct += float((out.argmax(1) == y).sum())
        return {"heldout_loss": loss / len(labels), "heldout_accuracy": correct / len(labels)}

    def open_live(self) -> None:
        """Start the per-epoch log, given the epochs already done (after a resume); rank 0
        logs for every rank."""
        if self.open_log is not None and self.ranks.main:
            self.live = self.open_log(self.log)

    def _check_finite(self, loss: float) -> None:
        """Stop, naming the epoch and step, when the loss or a weight is no longer finite:
        such a model is never saved (nor its resume checkpoint)."""
        epoch = self.epochs_done + 1
        if not math.isfinite(loss):
            steps = torch.stack(self._step_losses)
            first = int((~torch.isfinite(steps)).nonzero()[0, 0]) + 1
            value = float(steps[first - 1])
            raise PipelineError(
                f"{self.name}: the loss became {value} at epoch {epoch}, step {first} of "
                f"{len(steps)}; nothing was written (try a lower --lr, or check the loss)"
            )
        finite = [torch.isfinite(p).all() for p in self.model.parameters()]
        if finite and not bool(torch.stack(finite).all()):
            raise PipelineError(
                f"{self.name}: weights became NaN/Inf in epoch {epoch}; nothing was written "
                "(try a lower --lr or --weight-decay)"
            )

    def _swap_rng_in(self, device: torch.device) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)

    def _swap_rng_out(self, device: torch.device) -> None:
        self.rng = torch.get_rng_state()
        if self.cuda_rng is not None:
            self.cuda_rng = torch.cuda.get_rng_state(device)

    # -- per-epoch checkpoints -------------------------------------------------------------

    def save(self) -> None:
        """Write everything needed to continue after the last finished epoch (atomically);
        rank 0 writes for every rank."""
        if self.checkpoint is None or not self.ranks.main:
            return
        state = {
            "format": RESUME_FORMAT,
            "identity": self.identity,
            "epochs_done": self.epochs_done,
            "steps_done": self.steps_done,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "extra": None if self.terms is None else self.terms.modules.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": self.rng,
            "cuda_rng": self.cuda_rng,
            "log": self.log,
        }
        with atomic_output(self.checkpoint, overwrite=True) as tmp:
            torch.save(state, tmp)

    def restore(self, device: torch.device) -> bool:
        """Load the checkpoint if there is one; False when there is none. Under torchrun,
        rank 0 reads it and every rank loads those bytes (pipeline.core.distributed)."""
        if self.checkpoint is None:
            return False
        raw = None
        if self.ranks.main and self.checkpoint.is_file():
            try:
                raw = self.checkpoint.read_bytes()
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise PipelineError(
                    f"{self.checkpoint}: not a readable checkpoint ({reason})"
                ) from None
        raw = broadcast_bytes(self.ranks, raw, device)
        if raw is None:
            return False
        state = self._checked(raw, device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.terms is not None and state.get("extra") is not None:
            self.terms.modules.load_state_dict(state["extra"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epochs_done, self.steps_done = state["epochs_done"], state["steps_done"]
        self.rng = state["rng"].cpu()
        if state["cuda_rng"] is not None and device.type == "cuda":
            self.cuda_rng = state["cuda_rng"].cpu()
        self.log = list(state["log"])
        self.resumed = True
        return True

    def _checked(self, raw: bytes, device: torch.device) -> dict[str, Any]:
        """The checkpoint's state from its bytes, refused unless this run's settings made it."""
        try:
            state = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
        except Exception as e:  # torch raises many types for a corrupt or foreign file
            raise PipelineError(
                f"{self.checkpoint}: not a readable checkpoint ({type(e).__name__})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise PipelineError(f"{self.checkpoint}: not a kd-pipeline resume checkpoint")
        old = state["identity"]
        changed = sorted(
            k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k)
        )
        if "cache" in changed:  # the student's teacher: said first, and plainly
            was, now = str(old.get("cache"))[:12], str(self.identity.get("cache"))[:12]
            raise PipelineError(
                f"{self.checkpoint}: saved by a run on another teacher cache (identity {was}, "
                f"now {now}: the cache was replaced, or another given); resuming would mix two "
                "teachers in one student: delete it to start afresh"
            )
        if changed:
            k = changed[0]
            raise PipelineError(
                f"{self.checkpoint}: saved by a run with other settings ({k}: "
                f"{old.get(k)!r}, now {self.identity.get(k)!r}); delete it to start afresh"
            )
        return state

    def discard_checkpoint(self) -> None:
        if self.checkpoint is not None and self.ranks.main:
            remove(self.checkpoint)


def fit_many(
    trainees: list[Trainee],
    data: TrainData,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    desc: str = "train",
    resume: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    ranks: Ranks = SINGLE,
) -> list[list[dict[str, float]]]:
    """Train every trainee on the same batches; returns each one's log (a row per epoch).

    `resume`: continue each trainee from its checkpoint, where one exists.
    `on_epoch_end(epoch)` runs after each epoch's checkpoints are written.
    """
    if epochs < 1 or batch_size < 1:
        raise PipelineError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if len(data) == 0:
        raise PipelineError("no rows to train on")
    for t in trainees:
        t.setup(device, ranks)
        if resume:
            t.restore(device)
        t.open_live()
    steps_per_epoch = -(-len(data) // batch_size)
    labelled = int((data.labels >= 0).sum())
    first = min(t.epochs_done for t in trainees)
    bar = progress(total=(epochs - first) * steps_per_epoch, desc=desc, unit="step")
    for epoch in range(first, epochs):
        active = [t for t in trainees if t.epochs_done == epoch]
        for t in active:
            t.begin_epoch(device)
        for x, y, targets in data.batches(epoch, batch_size, seed):
            x, y, targets, share = _rank_share(x, y, targets, ranks)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for t in active:
                t.step(x, y, targets, steps_per_epoch, epochs, share)
            bar.update(1)
        rows = [t.end_epoch(labelled) for t in active]
        for t, row in zip(active, rows, strict=True):
            if data.heldout is not None:
                row.update(t.measure(*data.heldout))
            t.save()
            if t.live is not None:
                t.live.log(row)
        if rows:
            bar.set_postfix(_postfix(epoch, rows))
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        kill_if_asked(epoch, ranks)
    bar.close()
    for t in trainees:
        t.model.eval()
    return [t.log for t in trainees]


def kill_if_asked(epoch: int, ranks: Ranks) -> None:
    """The test hook of KILL_AFTER_EPOCH_ENV: a kill -9 between epochs, on one rank."""
    asked = os.environ.get(KILL_AFTER_EPOCH_ENV)
    if not asked:
        return
    at, _, rank = asked.partition(":")
    if epoch + 1 == int(at):
        barrier(ranks)  # every rank is past epoch K, and rank 0 has written its checkpoint
        if ranks.rank == int(rank or 0):
            os.kill(os.getpid(), signal.SIGKILL)


def _autocast(precision: str, device: torch.device):
    """Mixed precision for one step's forward pass and loss (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _rank_share(
    x: torch.Tensor, y: torch.Tensor, targets: TargetBatch | None, ranks: Ranks
) -> tuple[torch.Tensor, torch.Tensor, TargetBatch | None, float]:
    """This rank's slice of a global batch and its share (rows × ranks / batch rows). A rank
    left without rows steps on a stand-in row with share 0, so every rank still joins the
    gradient all-reduce."""
    if not ranks.active:
        return x, y, targets, 1.0
    part = ranks.share(len(y))
    share = (part.stop - part.start) * ranks.world / len(y)
    if share == 0.0:
        part = slice(0, 1)
    if targets is not None:
        members, seeds, features = targets.members, targets.seeds, targets.features
        targets = dataclasses.replace(
            targets,
            logits=targets.logits[part],
            members=None if members is None else members[:, part],
            seeds=None if seeds is None else seeds[part],
            features=None if features is None else {k: v[part] for k, v in features.items()},
        )
    return x[part], y[part], targets, share


def _postfix(epoch: int, rows: list[dict[str, float]]) -> dict[str, str]:
    """The bar's suffix after an epoch: loss and accuracy (held-out when measured), averaged
    over the models that trained in it."""
    key = "heldout_accuracy" if "heldout_accuracy" in rows[0] else "train_accuracy"
    loss = sum(r["loss"] for r in rows) / len(rows)
    acc = sum(r[key] for r in rows) / len(rows)
    name = "heldout_acc" if key == "heldout_accuracy" else "acc"
    return {"epoch": str(epoch + 1), "loss": f"{loss:.4f}", name: f"{acc:.3f}"}


def fit(
    model: nn.Module,
    data: TrainData,
    loss_fn: LossOnBatch,
    optim: OptimConfig,
    *,
    seed: int,
    device: torch.device,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train one model for `optim.epochs` (labels only, or with `data.targets` passed to
    `loss_fn` as given)."""
    teacher = None if data.targets is None else (lambda b: b.logits)
    trainee = Trainee(desc, model, loss_fn, optim, teacher=teacher)
    (log,) = fit_many(
        [trainee],
        data,
        epochs=optim.epochs,
        batch_size=optim.batch_size,
        seed=seed,
        device=device,
        desc=desc,
    )
    return log


def check_output_classes(
    model: nn.Module, sample: torch.Tensor, num_classes: int, what: str
) -> None:
    """Refuse a model that fails on `sample` (B, ...) or whose output is not a
    (B, num_classes) tensor, in one line naming `what`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # a layer that does not fit the data's shape, most often
        shape = tuple(sample.shape[1:])
        raise PipelineError(
            f"{what} fails on the data's inputs of shape {shape} ({one_line(e)})"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise PipelineError(
            f"{what} returns {type(out).__name__}, expected a (batch, classes) tensor of logits"
        )
    if out.ndim != 2 or out.shape[1] != num_classes:
        got = f"{out.shape[1]} classes" if out.ndim == 2 else f"shape {tuple(out.shape)}"
        raise PipelineError(f"{what} outputs {got}, but the cache has {num_classes} classes")


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: np.ndarray,
    batch_size: int,
    device: torch.device,
    desc: str | None = None,
) -> np.ndarray:
    """Logits of `model` on `inputs` in eval mode, with a progress bar per batch when
    `desc` is given.  # (N, C) float32"""
    model.eval().to(device)
    out = []
    quiet = {"disable": True} if desc is None else {}
    bar = progress(total=len(inputs), desc=desc, unit="sample", **quiet)
    for s in range(0, len(inputs), batch_size):
        out.append(model(torch.from_numpy(inputs[s : s + batch_size]).to(device)).float().cpu())
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
