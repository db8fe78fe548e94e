"""Running under torchrun: which rank this process is, and the few collectives it needs.

`precompute-logits` under torchrun shares the shards of one cache between the ranks (see
`pipeline.teacher.precompute`): rank 0 opens the partial cache, every rank writes whole shards of
its own, rank 0 finishes; the bytes are those one process writes.

`torchrun --nproc-per-node N -m pipeline train-student ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set. Every rank walks the same global batches (the epoch order is a
function of the seed and the epoch alone) and trains on its contiguous slice of each, inside
DistributedDataParallel; each rank's loss is weighted by its share of the batch, so the
averaged gradient is the global batch's and N ranks end with the weights one process gets
(within float tolerance; not with dropout, where each rank draws its own slice's masks).
Rank 0 alone locks, logs and writes outputs and checkpoints.

Resume: rank 0 writes OUT.resume.pt once an epoch's all-reduce is done, so the checkpoint
holds what every rank holds. `--resume` reads it on rank 0 and broadcasts its bytes, so every
rank continues from the checkpoint rank 0 wrote (no file system shared between the ranks is
needed, and a rank never reads a file rank 0 is replacing). The checkpoint does not depend on
the number of ranks: a run killed under N ranks resumes under M ranks, or in one process, and
ends with the weights of an uninterrupted run (within float tolerance; without dropout, whose
per-rank random state is not saved). A killed rank ends the run: torchrun stops the others.

`train-students` spreads a sweep over the ranks in one of two ways (`--spread`):
- `students` (the default; about 2x faster than `batches` for the digits sweep on 2 CPU ranks,
  README: Spreading a sweep over ranks): rank r trains students r, r + N, r + 2N, ... of the
  sweep as a plain single-process run (no process group, no collectives; its students that share
  a data pipeline in lockstep, as one process does), so each student is byte-identical to the
  same student trained by one process alone; each rank locks, logs, checkpoints and writes the
  students it trains; a killed rank ends the run too, and `--resume` continues each student from
  its own checkpoint, under any number of ranks.
- `batches`: every student is trained by all N ranks together with DDP, one lockstep group
  after another, as `train-student` does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; the default is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous slice of a batch of `n` rows (sizes differ by at most 1)."""
        bounds = np.linspace(0, n, self.world + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))


SINGLE = Ranks()  # one process, no torchrun


def spread_students(items: list, ranks: Ranks) -> list:
    """The items rank r trains under `--spread students`: r, r + N, r + 2N, ... (all of them
    when single)."""
    return items[ranks.rank :: ranks.world]


def alone(ranks: Ranks) -> Ranks:
    """This rank as a single process of its own (`--spread students`): no process group, and
    CUDA's current device its local GPU, so that `--device auto` or `cuda` trains there."""
    if ranks.active and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
    return SINGLE


def from_env() -> Ranks:
    """The ranks torchrun set in the environment (a single process when it did not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not ranks.active:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            # A gloo worker thread may still be freeing the last collective's work, which
            # takes the GIL, while the process group's destructor (run later, when DDP's
            # reducer is freed) joins that thread holding the GIL: a deadlock seen once under
            # load (rank 0 hung at exit). A moment without the GIL lets the worker finish.
            time.sleep(0.05)
            dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


def broadcast_bytes(ranks: Ranks, data: bytes | None, device: torch.device) -> bytes | None:
    """Rank 0's `data` (None: it has none) on every rank; `device`: where the collective
    runs (the rank's CUDA device under NCCL)."""
    if not ranks.active:
        return data
    import torch.distributed as dist

    size = -1 if data is None else len(data)  # only rank 0's counts
    size_t = torch.tensor([size], dtype=torch.int64, device=device)
    dist.broadcast(size_t, 0)
    size = int(size_t)
    if size < 0:
        return None
    if ranks.main:
        buffer = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).to(device)
    else:
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
    dist.broadcast(buffer, 0)
    return data if ranks.main else buffer.cpu().numpy().tobytes()


def all_sum(ranks: Ranks, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each value summed over the ranks (as given when single)."""
    if not ranks.active:
        return list(values)
    import torch.distributed as dist

    stacked = torch.stack([v.double() for v in values])
    dist.all_reduce(stacked)
    return list(stacked)
