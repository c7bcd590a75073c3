"""Latent cache storage and read benchmark: codecs and chunk shapes for float16 latents, side by side.

    .venv/bin/python benchmarks/bench_cache.py [--samples 4096] [--shape 32 8 8] [--source STORE]

Prints, for each codec and chunk shape: bytes per sample and size relative to raw float32, write
and full-read time. Then random 256-sample minibatch throughput straight from Zarr vs gathered
from the split loaded in memory (and training's streamed reads, cache/loader.py), the end-to-end
writer time, and the float16 storage error relative to the latent std. Uses the latents of
--source (a cache such as artifacts/cache/train.zarr) when it exists, else synthetic DC-AE-like
latents: per-element mean offsets and scales around a normal core.

Last, object storage against local disk (skip with --no-s3): a local S3-compatible server (moto's
server mode on 127.0.0.1, started as tests/s3_server.py does) serves a bucket over HTTP, and the
script prints side by side the encode-store write throughput (CacheWriter stage + finalize) and
the whole-split read throughput (LatentCache.load_latents, parallel chunk-aligned blocks) for
s3:// and for the local disk, so the protocol's overhead is visible. moto keeps objects in memory
in this process, so the figures are the HTTP + S3 protocol cost without a network.
"""

from __future__ import annotations

import argparse
import sys
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from revq_pipe.cache import storage
from revq_pipe.cache.loader import LatentSource
from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.schema import LATENT_CODEC, latent_compressors
from revq_pipe.cache.writer import CacheWriter
from revq_pipe.stages.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3_server: the tests' S3 server

CODECS = {
    "none": [],
    "zstd-3 (no shuffle)": [ZstdCodec(level=3)],
    "blosc lz4 shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)],
    "blosc zstd-1 shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2)],
    "blosc zstd-3 shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)],
    "blosc zstd-5 shuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=2)],
    "blosc zstd-7 shuffle": [BloscCodec(cname="zstd", clevel=7, shuffle="shuffle", typesize=2)],
    "blosc zstd-5 bitshuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=2)],
}
CHUNK_ROWS = (64, 256, 1024)


def synthetic_latents(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(n, C, H, W) float32 with per-element offsets and log-normal scales, like VAE latents."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 1, size=shape)
    scales = np.exp(rng.normal(0, 0.5, size=shape))
    return (offsets + scales * rng.standard_normal((n, *shape))).astype(np.float32)


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of fn() in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_layout(root: Path, data: np.ndarray, codecs: list, rows: int) -> tuple[float, float, float]:
    """(bytes per sample, write s, full read s) of one codec and chunk shape."""
    path = root / f"layout_{time.perf_counter_ns()}.zarr"
    array = zarr.create_array(path, shape=data.shape, chunks=(rows, *data.shape[1:]), dtype=data.dtype,
                              compressors=codecs)
    write_s = timed(lambda: array.__setitem__(slice(None), data))
    read_s = timed(lambda: array[:], repeats=2)
    size = directory_bytes(path)
    shutil.rmtree(path)
    return size / len(data), write_s, read_s


def write_store(location, data32: np.ndarray) -> float:
    """Seconds for CacheWriter to stage and finalize data32 at location (a folder or a URL)."""
    n = len(data32)
    start = time.perf_counter()
    writer = CacheWriter.open(location, num_inputs=n, latent_shape=data32.shape[1:], split="bench",
                              vae_identity={"source": "bench", "class": None, "weights_sha256": None},
                              image_recipe={}, source=None, chunk_size=256)
    for u in writer.pending_units():
        lo, hi = writer.unit_range(u)
        writer.write_unit(u, data32[lo:hi], np.full(hi - lo, -1), [f"{i}" for i in range(lo, hi)], [])
    writer.finalize()
    return time.perf_counter() - start


def object_storage_section(root: Path, data32: np.ndarray) -> None:
    """Encode-store writes and whole-split reads: local moto S3 server vs local disk, side by side."""
    try:
        from tests.s3_server import S3TestServer
    except ImportError as err:
        print(f"\nobject storage: skipped ({err}; install moto[server] and s3fs)")
        return
    server = S3TestServer()
    endpoint = server.endpoint_url
    try:
        with server.environment():
            bucket = server.create_bucket()
            n = len(data32)
            places = {"local disk": root / "s3cmp_local.zarr", f"S3 ({endpoint})": f"s3://{bucket}/bench/train.zarr"}
            print(f"\n{'object storage vs local disk':34} {'write MB/s':>10} {'write smp/s':>11} "
                  f"{'read MB/s':>10} {'read smp/s':>11} {'stored MB':>9}")
            for name, location in places.items():
                write_s = write_store(location, data32)
                cache = LatentCache.open(location)
                read_s = timed(lambda: cache.load_latents(), repeats=2)
                fs, key = storage.filesystem(location)
                stored = sum(i["size"] for i in fs.find(key, detail=True).values())
                mb = cache.nbytes / 1e6  # float16 latents as loaded (the work both sides do)
                print(f"{name:34} {mb / write_s:10.1f} {n / write_s:11,.0f} {mb / read_s:10.1f} {n / read_s:11,.0f} "
                      f"{stored / 1e6:9.2f}")
            remote = LatentCache.open(places[f"S3 ({endpoint})"])
            one_s = timed(lambda: remote.load_latents(threads=1), repeats=2)
            print(f"{'S3 read, one block at a time':34} {'':>10} {'':>11} {remote.nbytes / 1e6 / one_s:10.1f} "
                  f"{n / one_s:11,.0f}")
            print("(write = CacheWriter stage + finalize, float16, 256-row chunks; read = LatentCache.load_latents "
                  "of the whole split, MB of float16 latents per second)")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="latents to use (synthetic or first of --source)")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 8, 8), help="synthetic latent shape C H W")
    parser.add_argument("--source", default="artifacts/cache/train.zarr", help="a cache to take real latents from")
    parser.add_argument("--batch", type=int, default=256, help="minibatch size for the read comparison")
    parser.add_argument("--batches", type=int, default=10, help="random minibatches timed")
    parser.add_argument("--no-s3", action="store_true", help="skip the object storage vs local disk section")
    args = parser.parse_args()

    # ---- data ----
    if (Path(args.source) / "zarr.json").is_file():
        source = LatentCache.open(args.source)
        data32 = source.load_latents()[: args.samples].float().numpy()
        origin = f"real latents from {args.source}"
    else:
        data32 = synthetic_latents(args.samples, tuple(args.shape))
        origin = "synthetic latents (per-element offsets + log-normal scales)"
    data16 = data32.astype(np.float16)
    n, raw32 = len(data32), data32[0].size * 4
    print(f"{origin}: {n} x {tuple(data32.shape[1:])}, raw float32 {raw32} B/sample, torch threads "
          f"{torch.get_num_threads()}")
    root = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        # ---- codecs at 256-row chunks ----
        print(f"\n{'codec (float16, 256-row chunks)':34} {'B/sample':>9} {'vs f32':>7} {'ratio':>6} "
              f"{'write MB/s':>10} {'read MB/s':>10}")
        mb = data16.nbytes / 1e6
        for name, codecs in CODECS.items():
            per_sample, write_s, read_s = measure_layout(root, data16, codecs, 256)
            print(f"{name:34} {per_sample:9.0f} {per_sample / raw32:7.3f} {data16[0].nbytes / per_sample:6.3f} "
                  f"{mb / write_s:10.0f} {mb / read_s:10.0f}")
        default = latent_compressors("float16")
        print(f"default: blosc {LATENT_CODEC}")

        # ---- chunk shapes with the default codec ----
        print(f"\n{'chunk rows (default codec)':34} {'B/sample':>9} {'vs f32':>7} {'write MB/s':>10} "
              f"{'read MB/s':>10} {'rand 256 ms':>11}")
        rng = np.random.default_rng(0)
        batches = [np.sort(rng.choice(n, size=min(args.batch, n), replace=False)) for _ in range(args.batches)]
        for rows in CHUNK_ROWS:
            path = root / f"chunks_{rows}.zarr"
            array = zarr.create_array(path, shape=data16.shape, chunks=(rows, *data16.shape[1:]),
                                      dtype="float16", compressors=default)
            write_s = timed(lambda: array.__setitem__(slice(None), data16))
            read_s = timed(lambda: array[:], repeats=2)
            random_s = timed(lambda: [array.oindex[idx] for idx in batches]) / len(batches)
            per_sample = directory_bytes(path) / n
            print(f"{rows:<34} {per_sample:9.0f} {per_sample / raw32:7.3f} {mb / write_s:10.0f} "
                  f"{mb / read_s:10.0f} {random_s * 1e3:11.1f}")

        # ---- the real writer end to end, then minibatch reads from disk vs memory ----
        store = root / "store.zarr"
        writer_s = write_store(store, data32)
        cache = LatentCache.open(store)
        print(f"\nCacheWriter (stage + finalize, float16, 256-row chunks): {writer_s:.2f} s = "
              f"{n / writer_s:,.0f} samples/s; {directory_bytes(store) / n:.0f} B/sample on disk")

        array = zarr.open_array(store / "latents", mode="r")
        load_s = timed(lambda: cache.load_latents())
        in_memory = cache.load_latents()
        gather_idx = [torch.from_numpy(idx) for idx in batches]
        zarr_s = timed(lambda: [torch.from_numpy(array.oindex[idx]).float() for idx in batches]) / len(batches)
        memory_s = timed(lambda: [in_memory[idx].float() for idx in gather_idx], repeats=3) / len(batches)
        streamed = LatentSource(cache, torch.device("cpu"), "never", shuffle_window=TrainConfig().shuffle_window)
        stream = streamed.epoch_batches(min(args.batch, n), seed=0, epoch=0)
        stream_s = timed(lambda: [next(stream) for _ in range(min(args.batches, n // args.batch))]) / max(
            1, min(args.batches, n // args.batch))
        b = min(args.batch, n)
        print(f"load whole split into memory: {load_s * 1e3:.0f} ms ({n / load_s:,.0f} samples/s)")
        print(f"{'random ' + str(b) + '-sample minibatch':40} {'ms/batch':>9} {'samples/s':>12}")
        for name, seconds in [("Zarr on disk, random indices", zarr_s), ("in memory, index gather", memory_s),
                              ("streamed (training's LatentSource)", stream_s)]:
            print(f"{name:40} {seconds * 1e3:9.2f} {b / seconds:12,.0f}")
        print(f"memory gather is {zarr_s / memory_s:,.0f}x faster than random Zarr reads")

        # ---- float16 storage error ----
        std = data32.astype(np.float64).std(0)
        err = np.abs(data16.astype(np.float64) - data32) / std
        print(f"\nfloat16 storage error / latent std: mean {err.mean():.2e}, max {err.max():.2e}, "
              f"rms {np.sqrt((err ** 2).mean()):.2e}")

        if not args.no_s3:
            object_storage_section(root, data32)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
