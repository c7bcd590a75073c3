"""torchrun / torch.distributed plumbing shared by encode, train and evaluate."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from revq_pipe.pipeline.device import resolve_device


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op in a single process)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.is_distributed:
            dist.broadcast(tensor, src=src)
        return tensor

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order."""
        if not self.is_distributed:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def run_on_main(ctx: DistContext, work, share: bool = False):
    """Run work() on rank 0 only; if it fails, every rank raises instead of waiting for it forever.

    Returns work()'s result on rank 0, and on the other ranks too when `share` (else None).
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = work()
        except Exception as failure:  # re-raised below, after the other ranks have heard of it
            error = failure
    succeeded, shared = ctx.all_gather_object((error is None, result if share else None))[0]
    if error is not None:
        raise error
    if not succeeded:
        raise RuntimeError("rank 0 failed (its error message says why); stopping this rank as well")
    return result if ctx.is_main else shared


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one; gloo on CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


@contextlib.contextmanager
def distributed(device_preference: str = "auto") -> Iterator[DistContext]:
    """One stage's place in the job: joins the torchrun process group if there is one, and leaves it
    afterwards only if this call joined it (a caller that already holds the group keeps it)."""
    joined_here = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(device_preference)
    try:
        yield ctx
    finally:
        if joined_here and ctx.is_distributed and dist.is_initialized():
            dist.destroy_process_group()
