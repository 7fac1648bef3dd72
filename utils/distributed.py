"""Stage: scale-out. Data-parallel evaluation under ``torchrun`` or ``accelerate launch``.

Both launchers set WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Each process loads
the model and the pool once and takes every WORLD_SIZE-th batch of the length-sorted batches that a
single process would run, so every row is generated in the same batch, with the same padding, as in a
single-process run; rank 0 then merges the per-rank checkpoints into one results file in input order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """World size, rank and local rank from the launcher's environment (1, 0, 0 when not launched)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, use_cuda: bool) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU); a no-op for a single process."""
    if not info.enabled:
        return
    import torch
    import torch.distributed as dist

    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=info.rank, world_size=info.world_size)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def my_batches(batches: list[list[int]], info: DistInfo) -> list[list[int]]:
    """The batches this process runs: every world_size-th one, starting at its rank."""
    return batches[info.rank::info.world_size]
