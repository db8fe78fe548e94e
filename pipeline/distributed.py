"""Running under torchrun: which rank this process is, and the few collectives training needs.

`torchrun --nproc-per-node N pipeline train-student ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set. Every rank walks the same global batches (the epoch order is a
function of the seed and the epoch alone) and trains on its contiguous slice of each, inside
DistributedDataParallel; each rank's loss is weighted by its share of the batch, so the
averaged gradient is the global batch's and N ranks end with the weights one process gets
(within float tolerance). Rank 0 alone writes checkpoints, logs and outputs.
"""

from __future__ import annotations

import os
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
            dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


def all_sum(ranks: Ranks, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each value summed over the ranks (as given when single)."""
    if not ranks.active:
        return list(values)
    import torch.distributed as dist

    stacked = torch.stack([v.double() for v in values])
    dist.all_reduce(stacked)
    return list(stacked)
