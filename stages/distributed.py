"""torchrun / torch.distributed plumbing shared by encode, train, evaluate and tokenize.

Every collective of a job has a timeout (`dist.timeout_minutes`, generous by default: a phase that
legitimately runs long on one rank must never be taken for a hang), and a timeout says which phase of
the job it happened in (`DistContext.phase`). Nothing long runs on one rank while the others wait in a
collective: work that is serial by nature is bounded (creating a store, writing a manifest) or done by
every rank at once (assembling a store, initialising codebooks).
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from revq_pipe.cache.collective import run_everywhere
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.stages.launch import launch

DEFAULT_TIMEOUT_MINUTES = 60.0


class CollectiveTimeoutError(RuntimeError):
    """A collective waited longer than dist.timeout_minutes for another rank."""


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    current_phase: str = field(default="start")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name the span of a job; a collective that times out inside it says so."""
        outer, self.current_phase = self.current_phase, name
        try:
            yield
        except CollectiveTimeoutError:
            raise
        except RuntimeError as error:
            if self.is_distributed and _is_timeout(error):
                raise self._timeout_error(error) from error
            raise
        finally:
            self.current_phase = outer

    def _timeout_error(self, error: BaseException) -> CollectiveTimeoutError:
        return CollectiveTimeoutError(
            f"rank {self.rank} of {self.world_size} waited more than dist.timeout_minutes={self.timeout_minutes:g} for "
            f"the other ranks during phase '{self.current_phase}' ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}); a rank died or is much slower there: read its log, or raise "
            "dist.timeout_minutes if that phase needs longer")

    def _collective(self, run) -> None:
        try:
            run()
        except RuntimeError as error:
            if _is_timeout(error):
                raise self._timeout_error(error) from error
            raise

    def barrier(self) -> None:
        if self.is_distributed:
            self._collective(dist.barrier)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op in a single process)."""
        if self.is_distributed:
            self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def all_reduce_min_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Minimum of a tensor over ranks, in place."""
        if self.is_distributed:
            self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MIN))
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.is_distributed:
            self._collective(lambda: dist.broadcast(tensor, src=src))
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (the same shape on each) concatenated along dim 0, in rank order."""
        if not self.is_distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(lambda: dist.all_gather(parts, tensor.contiguous()))
        return torch.cat(parts)

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order."""
        if not self.is_distributed:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(gathered, obj))
        return gathered


def run_on_main(ctx: DistContext, work, share: bool = False):
    """Run short work() on rank 0 only (creating a store, writing a manifest); if it fails, every rank raises
    instead of waiting for it forever. Long work belongs on every rank, not here.

    Returns work()'s result on rank 0, and on the other ranks too when `share` (else None).
    """
    mine, every = run_everywhere(ctx, work if ctx.is_main else lambda: None, share=share)
    return mine if ctx.is_main else (every[0] if share else None)


def rank_device(requested: torch.device, local_rank: int, local_world_size: int, cuda_count: int) -> torch.device:
    """The device of one rank: an explicit "cuda:N" is honoured (one process per node only), a bare "cuda"
    becomes cuda:LOCAL_RANK; other devices stay as they are."""
    if requested.type != "cuda":
        return requested
    if requested.index is None:
        return torch.device("cuda", local_rank % cuda_count)
    if local_world_size > 1:
        raise ValueError(f"device={requested} names one GPU, but {local_world_size} processes on this machine would "
                         "all use it; pass device=cuda (or auto) so that rank r takes cuda:LOCAL_RANK, or choose "
                         "GPUs with CUDA_VISIBLE_DEVICES")
    return requested


def init_distributed(device_preference: str = "auto",
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistContext:
    """Join the torchrun process group if there is one: gloo on CPU, nccl on CUDA bound to this rank's GPU."""
    if not timeout_minutes > 0:
        raise ValueError(f"dist.timeout_minutes={timeout_minutes} must be positive")
    place = launch()
    device = resolve_device(device_preference)
    if device.type == "cuda":
        device = rank_device(device, place.local_rank, place.local_world_size, torch.cuda.device_count())
        torch.cuda.set_device(device)
    if place.world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=place.rank, world_size=place.world_size, timeout=timeout,
                                    device_id=device)
        else:
            dist.init_process_group("gloo", rank=place.rank, world_size=place.world_size, timeout=timeout)
    return DistContext(rank=place.rank, world_size=place.world_size, local_rank=place.local_rank, device=device,
                       timeout_minutes=timeout_minutes)


@contextlib.contextmanager
def distributed(device_preference: str = "auto",
                timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Iterator[DistContext]:
    """One stage's place in the job: joins the torchrun process group if there is one, and leaves it
    afterwards only if this call joined it (a caller that already holds the group keeps it)."""
    joined_here = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(device_preference, timeout_minutes)
    try:
        yield ctx
    finally:
        if joined_here and ctx.is_distributed and dist.is_initialized():
            dist.destroy_process_group()
