"""Where a split's latents live while a job reads them: resident in memory (or on the GPU) when they
fit, else streamed from the store; each rank's share; reproducible shuffling.

The whole ImageNet train split at float16 is ~5.25 GB, and random minibatches read straight from Zarr
take hundreds of milliseconds, so training keeps a split resident and gathers batches there.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from revq_pipe.cache.reader import LatentCache, rank_slice

# Independent random streams derived from (seed, stream, epoch): each is reproducible on its own,
# so resuming at an epoch boundary replays exactly what an uninterrupted run would have done.
INIT_STREAM, SHUFFLE_STREAM, RESET_STREAM = 0, 1, 2
RESIDENT_FRACTION = 0.5  # "auto" keeps a split resident when it takes at most this share of free memory
STREAM_SAMPLE_ROWS = 4096  # rows per read when drawing samples from a streamed split


def derived_generator(seed: int, stream: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, epoch), identical on every rank."""
    words = np.random.SeedSequence([seed % 2**63, stream, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _load_resident(cache: LatentCache, device: torch.device, *, show_progress: bool) -> torch.Tensor:
    """cache.load_latents(device); from a URL on rank 0 with a progress bar in bytes and bytes/s."""
    if not (show_progress and cache.is_remote):
        return cache.load_latents(device)
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    columns = (TextColumn("[bold]load {task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(str(cache.path), total=cache.nbytes)
        return cache.load_latents(device, progress=lambda n: bar.advance(task, n))


class LatentSource:
    """One split's raw latents: resident on the training device when it fits, else streamed from Zarr.

    Args:
        cache: the opened split.
        device: where batches are wanted.
        policy: "auto" (resident when it takes at most RESIDENT_FRACTION of the free memory), "always"
            or "never".
        rank, world_size: this process's place among the ranks that share the split.
    """

    def __init__(self, cache: LatentCache, device: torch.device, policy: str, *, rank: int = 0,
                 world_size: int = 1) -> None:
        self.cache = cache
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.num_samples = cache.num_samples
        self.nbytes = cache.nbytes
        self.resident = policy == "always" or (
            policy == "auto" and self.nbytes <= RESIDENT_FRACTION * _free_bytes(device))
        # kept in the stored dtype (float16 halves the footprint); batches are cast to float32
        self.data = _load_resident(cache, device, show_progress=rank == 0) if self.resident else None  # (N, C, H, W)

    def describe(self) -> str:
        where = f"resident on {self.device}" if self.resident else "streamed from Zarr"
        return f"{self.cache.path}: {self.num_samples} latents {tuple(self.cache.latent_shape)}, " \
               f"{self.nbytes / 2**20:,.1f} MiB, {where}"

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per rank per epoch; the same on every rank (the remainder is dropped)."""
        return self.num_samples // self.world_size // batch_size

    def epoch_batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's shuffled float32 batches (B, C, H, W) of one epoch, on the device."""
        steps = self.steps_per_epoch(batch_size)
        if not self.resident:
            stream = self.cache.iter_batches(batch_size, seed=seed, epoch=epoch, shuffle=True, rank=self.rank,
                                             world_size=self.world_size, drop_last=True)
            for _, batch in zip(range(steps), stream):
                yield batch.to(self.device, non_blocking=True)
            return
        order = torch.randperm(self.num_samples, generator=derived_generator(seed, SHUFFLE_STREAM, epoch))
        mine = order[self.rank * steps * batch_size:(self.rank + 1) * steps * batch_size].to(self.device)
        for index in mine.view(steps, batch_size):
            yield self.data[index].float()

    def shard_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """This rank's contiguous slice of the split in storage order (for validation), all samples."""
        lo, hi = rank_slice(self.num_samples, self.rank, self.world_size)
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            yield (self.data[start:stop].float() if self.resident else self.cache.read(start, stop).to(self.device))

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` distinct latents (float32, on the device), drawn without replacement."""
        if self.resident:
            return self.data[torch.randperm(self.num_samples, generator=generator)[:count].to(self.device)].float()
        # streaming: the first `count` latents of a shuffled pass (chunks in random order)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        taken, parts = 0, []
        for batch in self.cache.iter_batches(min(count, STREAM_SAMPLE_ROWS), seed=seed, epoch=0, shuffle=True):
            parts.append(batch[:count - taken])
            taken += len(parts[-1])
            if taken >= count:
                break
        return torch.cat(parts).to(self.device)
