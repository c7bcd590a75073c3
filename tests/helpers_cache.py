"""Tiny synthetic inputs and store comparisons shared by the cache tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revq_pipe.cache.writer import CacheWriter

SHAPE = (4, 2, 3)  # (C, H, W): small, with H != W to catch transposes
VAE = {"source": "tests/tiny-vae", "class": "AutoencoderKL", "weights_sha256": "ab" * 32}
RECIPE = {"resolution": 16, "resize": "shorter-side bilinear antialias", "crop": "center", "value_range": [-1, 1]}
SOURCE = "/data/images/train"


def make_inputs(num_inputs: int, seed: int = 0, shape=SHAPE):
    """Latents with per-element offsets (float32), labels, keys, and the indices treated as unreadable."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 3, size=shape)
    latents = (rng.normal(0, 1, size=(num_inputs, *shape)) * rng.uniform(0.5, 2, size=shape) + offsets)
    labels = rng.integers(-1, 5, size=num_inputs)
    keys = [f"class{labels[i]}/img_{i:04d}.png" for i in range(num_inputs)]
    skipped = {i for i in range(num_inputs) if i % 7 == 3}
    return latents.astype(np.float32), labels, keys, skipped


def open_writer(path, num_inputs: int, *, create: bool = True, overwrite: bool = False, **spec) -> CacheWriter:
    args = dict(latent_shape=SHAPE, split="train", vae_identity=VAE, image_recipe=RECIPE, source=SOURCE, chunk_size=5)
    args.update(spec)
    return CacheWriter.open(path, num_inputs=num_inputs, overwrite=overwrite, create=create, **args)


def write_units(writer, inputs, units) -> None:
    """Stage the given units of (rows, labels, keys, unreadable indices), e.g. make_inputs() output, with any
    store writer (CacheWriter, TokenWriter), skipping the 'unreadable' indices."""
    rows, labels, keys, skipped = inputs
    for u in units:
        start, stop = writer.unit_range(u)
        good = [i for i in range(start, stop) if i not in skipped]
        writer.write_unit(u, rows[good], labels[good], [keys[i] for i in good],
                          [(keys[i], "truncated file") for i in range(start, stop) if i in skipped])


def build_store(path, num_inputs: int = 23, seed: int = 0, **spec) -> None:
    """An uninterrupted single-rank build."""
    writer = open_writer(path, num_inputs, **spec)
    inputs = make_inputs(num_inputs, seed, spec.get("latent_shape", SHAPE))
    write_units(writer, inputs, writer.pending_units(0, 1))
    writer.finalize()


def store_files(path) -> dict[str, bytes]:
    """Every file of a store by relative path, for bit-for-bit comparisons."""
    root = Path(path)
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


class ThreadRanks:
    """World-size ranks as threads of this process, for the multi-rank writers' collectives (cache.collective):
    `run(work)` calls work(rank) on every rank at once and returns their results in rank order."""

    def __init__(self, world_size: int) -> None:
        import threading

        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=60)
        self._slots: list[object] = [None] * world_size

    def rank(self, r: int) -> "_ThreadRank":
        return _ThreadRank(self, r)

    def run(self, work) -> list:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.world_size) as pool:
            return list(pool.map(lambda r: work(self.rank(r)), range(self.world_size)))


class _ThreadRank:
    def __init__(self, ranks: ThreadRanks, rank: int) -> None:
        self._ranks, self.rank, self.world_size = ranks, rank, ranks.world_size

    def barrier(self) -> None:
        self._ranks._barrier.wait()

    def all_gather_object(self, obj: object) -> list[object]:
        self._ranks._slots[self.rank] = obj
        self.barrier()
        gathered = list(self._ranks._slots)
        self.barrier()  # nobody overwrites a slot before everyone has read them all
        return gathered
