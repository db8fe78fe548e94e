"""Training and measuring causal language models on sequence transfer sets: the loop that
train-teacher and train-student share for them (`pipeline.data.sequences`).

A batch is `batch_size` sequences, cut to the longest of them; the model's logits (b, L, V)
are taken at the distilled positions only, in row-major order (`LMBatch`): the order, and the
rows, of a token cache. The loss is cross-entropy on the next tokens, or, for a student,
(1 - alpha) CE + alpha times a distillation loss the caller computes from the batch (its
targets read from the cache by `rows`). Epochs visit the sequences in a permutation seeded
by (seed, epoch); the optimizer and schedule are `OptimConfig`'s, as for every model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import OptimConfig
from pipeline.core.distributed import SINGLE, Ranks, all_sum
from pipeline.core.progress import progress
from pipeline.core.training import Trainee, kill_if_asked, lr_at


@dataclass
class LMBatch:
    """A batch's distilled positions: the model's logits there (N, V), the tokens they
    predict (N,), and their rows in a token cache of the same sequences (N,)."""

    logits: torch.Tensor  # (N, V)
    labels: torch.Tensor  # (N,)
    rows: np.ndarray  # (N,) int64
    tokens: torch.Tensor | None = None  # (b, L) the batch's token ids (an online teacher's input)
    mask: torch.Tensor | None = None  # (b, L) its distilled positions


class Positions:
    """Where the distilled positions of a sequence set are, per sequence."""

    def __init__(self, seqs):  # seqs: pipeline.data.sequences.SequenceSet
        self.seqs = seqs
        self.starts = seqs.starts()  # (S,)
        self.counts = np.maximum(seqs.lengths - 1 - self.starts, 0)  # (S,) distilled positions
        self.first_row = np.cumsum(self.counts) - self.counts  # (S,) the row of each one's first

    def batch(self, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Token ids (b, L) of sequences `idx`, the mask of their distilled positions (b, L)
        and those positions' rows (N,), row-major."""
        length = int(self.seqs.lengths[idx].max())
        tokens = self.seqs.tokens[idx, :length]
        pos = np.arange(length)[None, :]
        starts = self.starts[idx][:, None]
        mask = (pos >= starts) & (pos < self.seqs.lengths[idx][:, None] - 1)  # (b, L)
        rows = (self.first_row[idx][:, None] + pos - starts)[mask]
        x = torch.from_numpy(tokens).long().to(device)
        return x, torch.from_numpy(mask).to(device), rows

    def labels(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next token of every distilled position.  # (N,)"""
        following = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)  # (b, L)
        return following[mask]


DistilFn = Callable[[LMBatch], torch.Tensor]

LANGUAGE_MODELS = (
    "gpt_nano, gpt_micro, gpt_mini, causal_transformer, a Hugging Face config directory or "
    "your own package.module:function"
)


def check_takes_tokens(model: nn.Module, seqs, vocab: int, what: str) -> None:
    """Refuse, in one line naming `what` (e.g. "--student mlp"), a model that does not map
    token ids (B, L) to logits (B, L, >= vocab): an image or sample model given sequences."""
    from pipeline.core.errors import PipelineError, one_line

    x = torch.from_numpy(seqs.tokens[:1, : min(seqs.context, 8)]).long()
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        with torch.no_grad():
            out = model.eval()(x.to(device))
    except Exception as e:  # a model made for samples raises anything on token ids
        raise PipelineError(
            f"{what}: does not take token sequences ({one_line(e)}); a language model is "
            f"{LANGUAGE_MODELS}"
        ) from None
    if out.ndim != 3 or tuple(out.shape[:2]) != tuple(x.shape) or out.shape[2] < vocab:
        raise PipelineError(
            f"{what}: gave {tuple(out.shape)} for token ids {tuple(x.shape)}, not next-token "
            f"logits (batch, length, {vocab}); a language model is {LANGUAGE_MODELS}"
        )


class Shuffled:
    """Epoch e visits the sequences in a permutation seeded by (seed, e), `batch_size` at a
    time (each batch sorted). A plan of batches: `steps` per epoch, `batches(epoch)`."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.steps = math.ceil(count / batch_size)

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        for i in range(self.steps):
            yield np.sort(order[i * self.batch_size : (i + 1) * self.batch_size])


def fit_lm(
    model: nn.Module,
    seqs,
    optim: OptimConfig,
    *,
    seed: int,
    device: torch.device,
    distil: DistilFn | None = None,
    alpha: float = 0.0,
    desc: str = "train",
    heldout=None,
    trainee: Trainee | None = None,
    resume: bool = False,
    plan=None,
    ranks: Ranks = SINGLE,
) -> list[dict[str, float]]:
    """Train `model` on the sequences `seqs` for `optim.epochs`; one log row per epoch (mean
    loss per token, the learning rate, and with `heldout` sequences their bits per token).

    `trainee` (made for `model`) carries the resume checkpoint and the per-epoch live log: each
    epoch ends with both written, and `resume` continues from the checkpoint, so a resumed
    run ends with the weights of an uninterrupted one. `plan` gives each epoch's batches
    (default `Shuffled`; a student streaming its targets passes its own).

    Under torchrun (`ranks`), every rank walks the same batches and trains inside DDP on its
    contiguous share of each batch's sequences, its mean loss weighted by its share of the
    batch's tokens times the ranks: the averaged gradient is the whole batch's, and N ranks
    end with the weights one process gets (within float tolerance; pipeline.core.distributed)."""
    trainee = trainee or Trainee(desc, model, None, optim)
    trainee.setup(device, ranks)
    if resume:
        trainee.restore(device)
    trainee.open_live()
    where = Positions(seqs)
    plan = plan or Shuffled(len(seqs), optim.batch_size, seed)
    steps = plan.steps
    first = trainee.epochs_done
    bar = progress(total=(optim.epochs - first) * steps, desc=desc, unit="step")
    for epoch in range(first, optim.epochs):
        row, losses = _epoch(trainee, plan, where, epoch, device, distil, alpha, bar)
        if heldout is not None:
            row["heldout_bits_per_token"] = measure_lm(model, heldout, device)["bits_per_token"]
        trainee.close_epoch(row, losses)
        bar.set_postfix(epoch=str(epoch + 1), loss=f"{row['loss']:.4f}")
        kill_if_asked(epoch, trainee.ranks)
    bar.close()
    model.eval()
    return trainee.log


def _epoch(trainee: Trainee, plan, where: Positions, epoch: int, device, distil, alpha, bar):
    """Train one epoch of `plan`'s batches; (its log row, its steps' losses)."""
    optim, model, ranks = trainee.optim, trainee.model, trainee.ranks
    model.train()
    torch.set_rng_state(trainee.rng)  # the model's own random state (dropout), resumable
    total, count, losses = 0.0, 0, []
    for i, idx in enumerate(plan.batches(epoch)):
        for group in trainee.opt.param_groups:
            group["lr"] = lr_at(optim, epoch * plan.steps + i, plan.steps, optim.epochs)
        loss, n = _step(trainee, where, idx, device, distil, alpha)
        total, count = total + float(loss) * n, count + n
        losses.append(loss)
        bar.update(1)
    trainee.rng = torch.get_rng_state()
    trainee.steps_done += plan.steps
    total, count = (float(v) for v in all_sum(ranks, *torch.tensor([total, float(count)])))
    row = {
        "epoch": epoch + 1,
        "loss": total / max(count, 1),
        "lr": trainee.opt.param_groups[0]["lr"],
    }
    return row, losses


def _step(
    trainee: Trainee, where: Positions, idx, device, distil, alpha
) -> tuple[torch.Tensor, int]:
    """One optimizer step on sequences `idx` (this rank's share of them); (this rank's mean
    loss, its distilled tokens)."""
    ranks, share = trainee.ranks, 1.0
    if ranks.active:
        mine = idx[ranks.share(len(idx))]
        tokens = int(where.counts[idx].sum())
        share = float(where.counts[mine].sum()) * ranks.world / max(tokens, 1)
        idx = mine if len(mine) else idx[:1]  # a rank with none steps with weight 0
        share = share if len(mine) else 0.0
    x, mask, rows = where.batch(idx, device)
    # index_select, not logits[mask]: its backward is index_add_, boolean indexing's is an
    # accumulating index_put_ (a fifth of a small student's step on a CPU).
    logits = trainee.net(x).flatten(0, 1).index_select(0, mask.flatten().nonzero()[:, 0])  # (N, V)
    labels = where.labels(x, mask)
    loss = F.cross_entropy(logits, labels)
    if distil is not None:
        loss = (1 - alpha) * loss + alpha * distil(LMBatch(logits, labels, rows, x, mask))
    trainee.opt.zero_grad(set_to_none=True)
    (loss * share if share != 1.0 else loss).backward()
    trainee.opt.step()
    return loss.detach(), len(labels) if share else 0


def measure_lm(
    model: nn.Module,
    seqs,
    device: torch.device,
    batch_size: int = 64,
    teacher_top1: np.ndarray | None = None,
) -> dict[str, float]:
    """Bits per token and perplexity of `model` on the distilled positions of `seqs`, and
    with `teacher_top1` (N,) (a token cache's first top-k index per row) the share of
    positions where its most likely next token is the teacher's."""
    model.to(device).eval()
    where = Positions(seqs)
    nats, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for first in range(0, len(seqs), batch_size):
            idx = np.arange(first, min(first + batch_size, len(seqs)))
            x, mask, rows = where.batch(idx, device)
            logits = model(x)[mask].float()
            labels = where.labels(x, mask)
            nats += float(F.cross_entropy(logits, labels, reduction="sum"))
            if teacher_top1 is not None:
                top = torch.from_numpy(teacher_top1[rows].astype(np.int64)).to(device)
                agree += int((logits.argmax(1) == top).sum())
            n += len(labels)
    out = {"tokens": n, "bits_per_token": nats / max(n, 1) / math.log(2),
           "perplexity": math.exp(nats / max(n, 1))}  # fmt: skip
    if teacher_top1 is not None:
        out["top1_agreement"] = agree / max(n, 1)
    return out
