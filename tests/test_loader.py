"""The epoch order and the batches of each rank: the same whatever the residency and the number of ranks."""

from __future__ import annotations

import pytest
import torch

from revq_pipe.cache.loader import LatentSource, epoch_order, rank_share
from revq_pipe.cache.reader import LatentCache
from tests.helpers_cache import build_store

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    build_store(path, 49)  # 42 samples after the skipped inputs, in chunks of 5 rows
    return LatentCache.open(path)


def test_windowed_order_visits_every_sample_once_window_by_window():
    order = epoch_order(42, seed=3, epoch=0, shuffle_window=10, block=5)
    assert sorted(order.tolist()) == list(range(42))
    # the order is a sequence of windows, each all the rows of (at most) 2 whole blocks of 5 rows
    windows, blocks, taken = [], set(), 0
    for row in order.tolist():
        blocks.add(row // 5)
        taken += 1
        if len(blocks) == 2 and taken == sum(min(5, 42 - 5 * b) for b in blocks):
            windows.append(blocks)
            blocks, taken = set(), 0
    assert taken == sum(min(5, 42 - 5 * b) for b in blocks) and len(blocks) == 1  # the 9th block alone
    windows.append(blocks)
    assert len(windows) == 5 and all(len(w) <= 2 for w in windows)
    assert set().union(*windows) == set(range(9))
    assert not torch.equal(order, epoch_order(42, seed=3, epoch=1, shuffle_window=10, block=5))
    assert torch.equal(order, epoch_order(42, seed=3, epoch=0, shuffle_window=10, block=5))
    # a split that fits one window is one plain permutation of the shuffle stream
    whole = epoch_order(42, seed=3, epoch=0, shuffle_window=64, block=5)
    assert torch.equal(whole, epoch_order(42, seed=3, epoch=0, shuffle_window=0, block=5))
    assert sorted(whole.tolist()) == list(range(42))


@pytest.mark.parametrize("window", [0, 10])
def test_ranks_and_residency_only_change_who_reads_which_rows(cache, window):
    def batches(policy, rank, world):
        source = LatentSource(cache, CPU, policy, rank=rank, world_size=world, shuffle_window=window, shuffle_block=5)
        return list(source.epoch_batches(12, seed=1, epoch=2))

    single = batches("always", 0, 1)
    assert len(single) == 4 and all(b.shape == (12, 4, 2, 3) and b.dtype == torch.float32 for b in single)
    for policy in ("always", "never"):
        for world in (1, 2, 3):
            ranks = [batches(policy, r, world) for r in range(world)]
            for step, whole in enumerate(single):  # rank r holds the r-th slice of every global batch
                assert torch.equal(torch.cat([ranks[r][step] for r in range(world)]), whole), (policy, world, step)
    stored = cache.load_latents().float()
    order = epoch_order(42, seed=1, epoch=2, shuffle_window=window, block=5)
    # every sample once, and the last batch filled up with the first 6 of the same order
    assert torch.equal(torch.cat(single), stored[torch.cat([order, order[:6]])])


def test_the_init_sample_is_the_same_resident_or_streamed(cache):
    resident = LatentSource(cache, CPU, "always").sample(17, torch.Generator().manual_seed(5))
    streamed = LatentSource(cache, CPU, "never").sample(17, torch.Generator().manual_seed(5))
    assert torch.equal(resident, streamed) and resident.shape == (17, 4, 2, 3)
    rows = (resident.reshape(17, 1, -1) == cache.load_latents().float().reshape(1, 42, -1)).all(-1).float().argmax(1)
    assert len(set(rows.tolist())) == 17


def test_a_global_batch_the_ranks_cannot_share_is_refused_naming_both_numbers():
    assert rank_share(256, 8) == 32
    with pytest.raises(ValueError, match=r"train.batch_size=250 is the global batch .* 8 ranks.*248 or 256"):
        rank_share(250, 8)
