"""Process group setup for `torchrun` (DDP): gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in a data-parallel run: `rank` of `world` processes, `local_rank` on
    its node, and the `device` it computes on. The default is one process on the CPU."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on rank 0, the process that writes logs, checkpoints and the final model."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process runs (collectives are real, not no-ops)."""
        return self.world > 1


def init_distributed() -> DistInfo:
    """Read WORLD_SIZE / RANK / LOCAL_RANK (set by torchrun; absent: one process), pick the device
    (cuda:LOCAL_RANK when CUDA is available, else CPU) and, with several processes, start the
    process group once (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def all_reduce_sum(x: torch.Tensor | float, info: DistInfo) -> torch.Tensor:
    """The sum of `x` over all processes, as a new CPU tensor (a float becomes a float64 scalar);
    `x` itself is not modified. One process: a copy of `x`. A collective: every rank must call it."""
    t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)
    if info.enabled:
        dev = info.device if info.device.type == "cuda" else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` (any picklable value) on every process; `obj` itself with one process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Tear the process group down after a finished run, once the models that used it are gone.
    Left to interpreter exit, or with FSDP state still alive, gloo's threads can abort a process
    ("terminate called without an active exception") after all the work is done."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # FSDP state kept alive by reference cycles holds the group's pending work
        dist.barrier()
        dist.destroy_process_group()
