"""Stage one throughput: the whole encode pipeline vs the VAE forward pass alone, on the same batches.

    python benchmarks/bench_encode.py                      # demo VAE (demo/vae) or a tiny random one,
                                                           # 512 generated 64x64 PNGs
    python benchmarks/bench_encode.py --images DIR --vae DIR --resolution 256 --batch-size 64

"full pipeline" is run_encode end to end: read + decode + preprocess in DataLoader workers, VAE
encode, staging, and the final Zarr assembly (VAE loading included). "VAE forward" encodes the
same images, pre-decoded into tensors, in the same batches. The overhead says how much longer
each image takes in the pipeline than in the forward pass alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers_vae, tests.s3_server: the tests' tiny VAE and S3 server

from revq_pipe.pipeline.images import decode_image, preprocess  # noqa: E402
from revq_pipe.pipeline.vae import FrozenVAE  # noqa: E402
from revq_pipe.stages.config import load_config  # noqa: E402
from revq_pipe.stages.datasets import open_image_dataset  # noqa: E402
from revq_pipe.stages.encode import run_encode  # noqa: E402


def generate_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Smooth random colour fields with noise, saved as PNG (compress like photos more than pure noise)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0.0, 1.0, size)
    for i in range(count):
        a, b, c = rng.uniform(0, 255, (3, 3))
        field = a * ramp[None, :, None] + b * ramp[:, None, None] + c * (1 - ramp[None, :, None])
        pixels = np.clip(field / 2 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def default_vae(scratch: Path) -> str:
    demo = REPO / "demo" / "vae"
    if (demo / "config.json").is_file():
        return str(demo)
    from tests.helpers_vae import make_tiny_vae

    print("demo/vae not found: using a tiny random AutoencoderDC (numbers then measure mostly the overhead)")
    return str(make_tiny_vae(scratch))


def encode_to_local_s3(cfg, images: str) -> float | None:
    """Seconds of the same run_encode into s3:// on a moto server on 127.0.0.1 (None without moto)."""
    try:
        from tests.s3_server import S3TestServer
    except ImportError as err:
        print(f"encode to S3: skipped ({err}; install moto[server] and s3fs)")
        return None
    server = S3TestServer()
    try:
        with server.environment():
            url = f"s3://{server.create_bucket()}/bench.zarr"
            start = time.perf_counter()
            run_encode(cfg, split="bench", images=images, out=url, overwrite=False)
            return time.perf_counter() - start
    finally:
        server.stop()


def time_forward(vae: FrozenVAE, images: torch.Tensor, batches: list[range], repeats: int) -> float:
    """Best wall time over `repeats` passes of vae.encode over the batches (after one warm-up batch)."""
    vae.encode(images[batches[0].start:batches[0].stop])
    best = float("inf")
    for _ in range(repeats):
        _sync(vae.device)
        start = time.perf_counter()
        for b in batches:
            vae.encode(images[b.start:b.stop])
        _sync(vae.device)
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="image source (default: generate --num-images PNGs)")
    parser.add_argument("--vae", help="VAE folder or hub id (default: demo/vae, else a tiny random VAE)")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="passes of the forward-only timing (best is kept)")
    parser.add_argument("--no-s3", action="store_true", help="skip the encode to a local S3 server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_encode_") as scratch:
        scratch = Path(scratch)
        images = args.images
        if images is None:
            images = str(scratch / "images")
            generate_images(Path(images), args.num_images, args.image_size)
        vae_source = args.vae or default_vae(scratch)
        cfg = load_config(None, [], {
            "vae.source": vae_source, "vae.device": args.device, "data.resolution": args.resolution,
            "encode.batch_size": args.batch_size, "encode.chunk_size": args.chunk_size,
            "encode.num_workers": args.workers,
        })

        # the full pipeline, end to end
        start = time.perf_counter()
        manifest = run_encode(cfg, split="bench", images=images, out=str(scratch / "bench.zarr"), overwrite=False)
        pipeline_s = time.perf_counter() - start
        s3_s = None if args.no_s3 else encode_to_local_s3(cfg, images)

        # the VAE alone on the same images, pre-decoded, in the same unit-aligned batches
        dataset = open_image_dataset(images)
        tensors, kept = [], 0
        for i in range(len(dataset)):
            try:
                tensors.append(preprocess(decode_image(dataset.read_bytes(i), dataset.key(i)), args.resolution))
            except ValueError:
                tensors.append(torch.zeros(3, args.resolution, args.resolution))  # skipped by the pipeline too
            else:
                kept += 1
        stacked = torch.stack(tensors)  # (N, 3, R, R)
        batches = [range(b, min(b + args.batch_size, u + args.chunk_size, len(dataset)))
                   for u in range(0, len(dataset), args.chunk_size)
                   for b in range(u, min(u + args.chunk_size, len(dataset)), args.batch_size)]
        vae = FrozenVAE.load(vae_source, device=args.device, precision=cfg.vae.precision)
        forward_s = time_forward(vae, stacked, batches, args.repeats)

    n = len(dataset)
    print(f"\n{n} images ({manifest.num_samples} encoded) at {args.resolution}px, batch {args.batch_size}, "
          f"{args.workers} workers, {vae.class_name} {vae_source} on {vae.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'':34}{'images/s':>12}{'seconds':>10}")
    print(f"{'VAE forward only (pre-decoded)':34}{n / forward_s:12,.1f}{forward_s:10.2f}")
    print(f"{'full pipeline (run_encode)':34}{n / pipeline_s:12,.1f}{pipeline_s:10.2f}")
    if s3_s is not None:
        print(f"{'full pipeline to S3 (local moto)':34}{n / s3_s:12,.1f}{s3_s:10.2f}")
    print(f"pipeline overhead: {100 * (pipeline_s - forward_s) / forward_s:+.1f}% time per image "
          "over the forward pass alone")


if __name__ == "__main__":
    main()
