"""Where a split's latents live while a job reads them, and in which order training sees them.

The order is the contract (docs/scale.md): an epoch's order of samples is a function of the
seed, the epoch and the number of samples only, and so is every global batch. Whether the split is
resident (in memory or on the GPU) or streamed from the store, and how many ranks share it, only
changes who reads which rows: rank r of W takes the r-th of W equal, contiguous slices of every global
batch. The whole ImageNet train split at float16 is ~5.25 GB and random rows read straight from Zarr
cost a whole chunk each, so the order is built to be streamable: when a split holds more than one
shuffle window, windows of `shuffle_window` samples (whole blocks of SHUFFLE_BLOCK rows, in shuffled
block order) are permuted internally, and a streaming reader reads one window at a time. A split that
fits one window is one plain permutation.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from revq_pipe.cache.collective import rank_slice
from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.choices import RESIDENCY

# Independent random streams derived from (seed, stream, epoch): each is reproducible on its own,
# so resuming at an epoch boundary replays exactly what an uninterrupted run would have done.
INIT_STREAM, SHUFFLE_STREAM, RESET_STREAM, HOLDOUT_STREAM = 0, 1, 2, 3
RESIDENT_FRACTION = 0.5  # "auto" keeps a split resident when it takes at most this share of free memory
SHUFFLE_BLOCK = 256  # rows: the unit the epoch order moves whole between windows (one chunk of a default cache)


def derived_generator(seed: int, stream: int, epoch: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, epoch), identical on every rank."""
    words = np.random.SeedSequence([seed % 2**63, stream, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle_window: int,
                block: int = SHUFFLE_BLOCK) -> torch.Tensor:
    """The order (N,) int64 in which an epoch visits the samples; `shuffle_window` 0 = the whole split.

    A split of at most one window is `randperm(N)`; a larger one is cut into `block`-row blocks, the
    blocks are shuffled and grouped into windows of shuffle_window // block blocks, and each window's
    rows are permuted: every sample once per epoch, and a window's rows are all a streaming reader
    needs at a time.
    """
    generator = derived_generator(seed, SHUFFLE_STREAM, epoch)
    window_blocks = max(1, shuffle_window // block)
    num_blocks = -(-num_samples // block)
    if shuffle_window <= 0 or num_blocks <= window_blocks:
        return torch.randperm(num_samples, generator=generator)
    blocks = torch.randperm(num_blocks, generator=generator)
    parts = []
    for start in range(0, num_blocks, window_blocks):
        rows = torch.cat([torch.arange(b * block, min((b + 1) * block, num_samples))
                          for b in blocks[start:start + window_blocks].tolist()])
        parts.append(rows[torch.randperm(len(rows), generator=generator)])
    return torch.cat(parts)


def rank_share(global_batch: int, world_size: int) -> int:
    """Each rank's share b = B / W of a global batch B; ValueError unless the ranks split it evenly."""
    if global_batch % world_size:
        lower = global_batch // world_size * world_size
        raise ValueError(f"train.batch_size={global_batch} is the global batch and does not split evenly over "
                         f"{world_size} ranks; use a multiple of {world_size}, e.g. "
                         f"{lower or world_size} or {lower + world_size}")
    return global_batch // world_size


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
    """One split's raw latents for one rank: resident on the device when it fits, else streamed.

    Args:
        cache: the opened split.
        device: where batches are wanted.
        policy: "auto" (resident when it takes at most RESIDENT_FRACTION of the free memory), "always"
            or "never". It changes how rows are read, never which rows a batch holds.
        rank, world_size: this process's place among the ranks that share the split.
        shuffle_window, shuffle_block: the windows and blocks of the epoch order (`epoch_order`).

    `split_off(count, seed)` divides a source into two that share its data (for a held-out part); a part
    visits its own rows, an ascending subset of the split's, so that neighbouring positions of its order
    stay neighbouring rows of the store.
    """

    def __init__(self, cache: LatentCache, device: torch.device, policy: str, *, rank: int = 0,
                 world_size: int = 1, shuffle_window: int = 0, shuffle_block: int = SHUFFLE_BLOCK) -> None:
        if policy not in RESIDENCY:
            raise ValueError(f"policy={policy!r} is not one of {', '.join(RESIDENCY)}")
        self.cache = cache
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.shuffle_window, self.shuffle_block = shuffle_window, shuffle_block
        self.rows: torch.Tensor | None = None  # (n,) ascending rows of the split this source visits; None = all
        self.num_samples = cache.num_samples
        self.nbytes = cache.nbytes
        self.resident = policy == "always" or (
            policy == "auto" and self.nbytes <= RESIDENT_FRACTION * _free_bytes(device))
        # kept in the stored dtype (float16 halves the footprint); batches are cast to float32
        self.data = _load_resident(cache, device, show_progress=rank == 0) if self.resident else None  # (N, C, H, W)

    def describe(self) -> str:
        where = f"resident on {self.device}" if self.resident else "streamed from Zarr"
        part = "" if self.rows is None else f" of {self.cache.num_samples}"
        return f"{self.cache.path}: {self.num_samples}{part} latents {tuple(self.cache.latent_shape)}, " \
               f"{self.nbytes / 2**20:,.1f} MiB, {where}"

    def split_off(self, count: int, seed: int) -> tuple["LatentSource", "LatentSource"]:
        """(the rest, `count` held-out samples): a random choice fixed by `seed` and the split's size only."""
        if not 0 < count < self.num_samples:
            raise ValueError(f"cannot hold out {count} of the {self.num_samples} latents of {self.cache.path}")
        chosen = torch.zeros(self.num_samples, dtype=torch.bool)
        chosen[torch.randperm(self.num_samples, generator=derived_generator(seed, HOLDOUT_STREAM))[:count]] = True
        return self._part(torch.nonzero(~chosen)[:, 0]), self._part(torch.nonzero(chosen)[:, 0])

    def _part(self, positions: torch.Tensor) -> "LatentSource":
        part = copy.copy(self)  # the same resident data, reader and placement
        part.rows = positions if self.rows is None else self.rows[positions]
        part.num_samples = len(part.rows)
        return part

    def _split_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the split at these positions of this source (int64, CPU)."""
        return positions if self.rows is None else self.rows[positions]

    def rank_batch(self, global_batch: int) -> int:
        """This rank's share of a global batch."""
        return rank_share(global_batch, self.world_size)

    def steps_per_epoch(self, global_batch: int) -> int:
        """Global batches per epoch, the same on every rank: every sample once, the last batch filled up."""
        return -(-self.num_samples // global_batch)

    def epoch_batches(self, global_batch: int, *, seed: int, epoch: int) -> Iterator[torch.Tensor]:
        """This rank's float32 slice (b, C, H, W) of every global batch of one epoch, on the device.

        The epoch visits every sample once in `epoch_order`; a last batch the samples do not fill takes the
        rest from the start of the same order (every global batch is whole, so the ranks split it evenly).
        """
        if global_batch > self.num_samples:
            raise ValueError(f"a global batch of {global_batch} is more than the {self.num_samples} latents")
        order = epoch_order(self.num_samples, seed=seed, epoch=epoch, shuffle_window=self.shuffle_window,
                            block=self.shuffle_block)
        steps, share = self.steps_per_epoch(global_batch), self.rank_batch(global_batch)
        order = torch.cat([order, order[:steps * global_batch - self.num_samples]])
        # (steps, share): the rows of this rank's slice of every global batch, in step order
        mine = self._split_rows(order).view(steps, self.world_size, share)[:, self.rank]
        if self.resident:
            for rows in mine.to(self.device):
                yield self.data[rows].float()
            return
        yield from self._streamed(mine, order_positions=steps * global_batch)

    def _streamed(self, mine: torch.Tensor, order_positions: int) -> Iterator[torch.Tensor]:
        """Read `mine`'s rows one shuffle window of the order at a time, the next window in the background."""
        steps, share = mine.shape
        window = self.shuffle_window if self.shuffle_window > 0 else order_positions
        steps_per_read = max(1, window // (share * self.world_size))  # global batches per read
        groups = [mine[s:s + steps_per_read] for s in range(0, steps, steps_per_read)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="revq-stream") as reader:
            pending = reader.submit(self._read_group, groups[0]) if groups else None
            for index in range(len(groups)):
                data = pending.result()  # (steps in the group, share, C, H, W), stored dtype, pinned on CUDA
                if index + 1 < len(groups):  # one read ahead: the next window loads while this one trains
                    pending = reader.submit(self._read_group, groups[index + 1])
                for batch in data:
                    yield batch.to(self.device, non_blocking=True).float()

    def _read_group(self, rows: torch.Tensor) -> torch.Tensor:
        data = torch.from_numpy(self.cache.read_rows(rows.reshape(-1).numpy()))
        data = data.view(*rows.shape, *data.shape[1:])
        return data.pin_memory() if self.device.type == "cuda" else data

    def shard_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """This rank's contiguous slice of the source's samples in storage order (for validation), all samples."""
        lo, hi = rank_slice(self.num_samples, self.rank, self.world_size)
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            if self.rows is None:
                yield self.data[start:stop].float() if self.resident else self.cache.read(start, stop).to(self.device)
            else:
                yield self._gather(self.rows[start:stop])

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` distinct latents (float32, on the device), the same ones resident or streamed."""
        return self._gather(self._split_rows(torch.randperm(self.num_samples, generator=generator)[:count]))

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The latents at these rows of the split, float32 on the device."""
        if self.resident:
            return self.data[rows.to(self.device)].float()
        return torch.from_numpy(self.cache.read_rows(rows.numpy())).to(self.device).float()
