"""What a multi-rank writer needs from the job it runs in, without depending on stages/ (which builds the job).

stages/distributed.py's DistContext is such a `Collective`; `SINGLE_PROCESS` stands in for a job of one.
`run_everywhere` is the one way ranks run their own part of a shared step: if any rank fails, every rank
raises instead of waiting for it in the next collective.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

T = TypeVar("T")


class Collective(Protocol):
    rank: int
    world_size: int

    def barrier(self) -> None: ...

    def all_gather_object(self, obj: object) -> list[object]: ...


class _SingleProcess:
    rank, world_size = 0, 1

    def barrier(self) -> None:
        return None

    def all_gather_object(self, obj: object) -> list[object]:
        return [obj]


SINGLE_PROCESS: Collective = _SingleProcess()


def run_everywhere(collective: Collective, work: Callable[[], T], share: bool = True) -> tuple[T, list[Any]]:
    """Run this rank's `work()`, then exchange (success, result) with every rank: returns (this rank's result,
    every rank's result in rank order, or Nones unless `share`). When a rank fails, it re-raises its error
    and the others raise too."""
    result, error = None, None
    try:
        result = work()
    except Exception as failure:  # re-raised below, after the other ranks have heard of it
        error = failure
    gathered = collective.all_gather_object((error is None, result if share and error is None else None))
    if error is not None:
        raise error
    failed = [rank for rank, (ok, _) in enumerate(gathered) if not ok]
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed (their error messages say why); stopping rank "
                           f"{collective.rank} as well")
    return result, [value for _, value in gathered]


def rank_slice(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi): rank r's contiguous share of num_items; shares are in rank order and differ by at most one."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return rank * num_items // world_size, (rank + 1) * num_items // world_size
