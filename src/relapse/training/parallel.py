"""Data parallelism over processes started by ``accelerate launch`` or ``torchrun``.

The launcher sets ``WORLD_SIZE``/``RANK`` (and the rendezvous address); relapse then splits every global
batch between the processes (rank ``r`` takes rows ``r, r + world, ...``), averages gradients across
them after the backward pass (an all-reduce, so any number of forward passes per step works, as GDR
and KLR need), lets every process evaluate (they hold identical weights, so they stop together), and
writes checkpoints and results from the main process only. Without a launcher nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel group."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Any) -> Any:
        """This process's rows of a batch (dicts of tensors, nested); all rows if there are too few."""
        if isinstance(batch, dict):
            return {key: self.shard(value) for key, value in batch.items()}
        if isinstance(batch, torch.Tensor) and batch.dim() > 0 and batch.shape[0] >= self.world:
            return batch[self.rank :: self.world]
        return batch

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes."""
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor) / self.world

    def barrier(self) -> None:
        dist.barrier()


def data_parallel() -> DataParallel | None:
    """The data-parallel group this process belongs to, joining it if needed; None when run alone."""
    if world_size() <= 1:
        return None
    if not dist.is_initialized():
        # Gradients live where the model is (a GPU, or the CPU with --device cpu) while loss averages
        # are CPU numbers: NCCL only takes CUDA tensors, so each device type gets its own backend.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return DataParallel(rank=dist.get_rank(), world=dist.get_world_size())


def world_size() -> int:
    """How many processes share the work (1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a launched data-parallel group."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of the group (no-op when run alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
