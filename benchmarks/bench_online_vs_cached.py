"""Benchmark: what the latent cache saves. Stage two fed online (JPEG -> DC-AE encoder) vs from the cache.

Both ways run the same training step (stages.train_loop.train_step, fused AdamW) at the 512T geometry
of configs/512T.yaml (T=512 tokens of d=4, K=16,384 codes per position, rectifier 512x3, docs/method.md's
learning rates, fp32 step) on 256x256 images, from identical seeded weights, at the same batch size:

    online (baseline): read a JPEG file, decode + shorter-side resize + centre crop with the project's
        recipe (pipeline.images.decode_image / preprocess), run the frozen DC-AE f32c32 encoder
        (pipeline.vae.FrozenVAE.encode), then the training step;
    cached (ours):     gather a random batch from the split held in memory (cache.reader.LatentCache.
        load_latents, then `data[index].float()`, as `revq-pipe train` does), then the training step.

The encoder is the architecture of mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers (the VAE of docs/method.md)
with random weights (no download here), built as a diffusers AutoencoderDC; its decoder is dropped, since
training only encodes. The config is the "dc-ae-f32c32-sana-1.0" entry of diffusers' conversion script
(huggingface/diffusers, scripts/convert_dcae_to_diffusers.py, get_ae_config); sana-1.1 has "the same
encoder as DC-AE-f32c32-SANA-1.0 while having a slightly better decoder" (mit-han-lab/efficientvit,
assets/docs/dc_ae_sana_1.1.md). The images are real JPEGs (quality 90): square crops of scikit-image's
demo photographs resized to 256x256. They are smaller than ImageNet's (about 400x350 on average), so
decoding costs less here than on ImageNet. The cache is stage one run on those JPEGs with the same
encoder (CacheWriter, float16); its statistics standardize the latents of both ways.

Each way runs in its own process (spawned), so each peak-memory figure is its own: on the CPU the peak
RSS (VmHWM, reset through /proc/self/clear_refs before every iteration) of that process during one
iteration, weights and optimizer state included; on CUDA torch.cuda.max_memory_allocated. The parent
drives both processes one iteration at a time, alternating ways, batch sizes and order, so a change in
machine load hits both alike; min / median / max are over --repeats iterations after warm-up.
The whole schedule: one encode pass (decode + encoder forward + cache write per sample) + loading the
split + 100 cached epochs, against 100 online epochs. The defaults (batch 4 and 8, 3 repeats) take
about 2 minutes on 2 idle CPU cores (4 to 6 while other jobs share them), nearly all of it in the encoder.

    .venv/bin/python benchmarks/bench_online_vs_cached.py [--batch-sizes 4,8] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderDC
from PIL import Image

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.writer import CacheWriter
from revq_pipe.demo.images import load_demo_photos
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.images import decode_image, preprocess, recipe
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.config import RevqConfig, load_config
from revq_pipe.stages.distributed import DistContext
from revq_pipe.stages.train_loop import TrainParts, build_optimizer, train_step

PRESET = Path(__file__).resolve().parents[1] / "configs" / "512T.yaml"
EPOCHS, IMAGENET_TRAIN = 100, 1_281_167  # docs/method.md's schedule
ENCODER_NAME = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers (architecture, random weights)"
# diffusers scripts/convert_dcae_to_diffusers.py, get_ae_config("dc-ae-f32c32-sana-1.0") = sana-1.1's encoder
DC_AE_F32C32_SANA = {
    "latent_channels": 32,
    "encoder_block_types": ("ResBlock", "ResBlock", "ResBlock",
                            "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"),
    "decoder_block_types": ("ResBlock", "ResBlock", "ResBlock",
                            "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"),
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "downsample_block_type": "conv",
    "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}


# --- shared by both ways ----------------------------------------------------------------------


def sync(device: torch.device) -> float:
    """perf_counter() after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: CUDA allocations, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def build_train_parts(cfg: RevqConfig, normalizer: LatentNormalizer, latent_shape: tuple[int, int, int],
                      device: torch.device) -> TrainParts:
    """The preset's quantizer and rectifier from seed 0 (identical in both ways), with the loop's optimizer."""
    qc, tc = cfg.quantizer, cfg.train
    torch.manual_seed(0)
    quantizer = MultiGroupQuantizer(latent_shape, qc.num_tokens, qc.codebook_size,
                                    search_memory_mb=qc.search_memory_mb).to(device)
    rectifier = build_rectifier(cfg.rectifier, latent_shape[0]).to(device)
    with torch.no_grad():  # a rectifier that is not the identity, so every layer gets gradients
        rectifier.conv_out.weight.normal_(0.0, 1e-3)
    rect_params = [p for p in rectifier.parameters() if p.requires_grad]
    optimizer = build_optimizer(quantizer.codebooks, rect_params, codebook_lr=tc.codebook_lr,
                                codebook_weight_decay=tc.codebook_weight_decay, rectifier_lr=tc.rectifier_lr,
                                rectifier_weight_decay=tc.rectifier_weight_decay)
    return TrainParts(normalizer=normalizer.to(device), quantizer=quantizer, rectifier=rectifier, rectify=rectifier,
                      optimizer=optimizer, train_rectifier=True, grad_clip=tc.grad_clip, precision=tc.precision,
                      deferred_search=device.type == "cuda")  # as stages/train.py builds them


def single_process(device: torch.device) -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=device)


def load_images(files: list[str], resolution: int) -> torch.Tensor:
    """Read, decode and preprocess JPEG files with the project's recipe -> (B, 3, R, R) in [-1, 1]."""
    return torch.stack([preprocess(decode_image(Path(f).read_bytes(), Path(f).name), resolution) for f in files])


def write_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> list[str]:
    """`count` JPEGs of size x size: random square crops (half to all of the short side) of the demo photos."""
    folder.mkdir(parents=True)
    photos = list(load_demo_photos().values())
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        side = int(rng.integers(min(width, height) // 2, min(width, height) + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        files.append(str(folder / f"{i:05d}.jpg"))
        crop.save(files[-1], quality=90)
    return files


# --- the online way (also writes the cache: stage one with the same encoder) -------------------


def build_encoder(device: torch.device, precision: str) -> FrozenVAE:
    """DC-AE f32c32 (sana-1.1 architecture) with seeded random weights and no decoder, frozen."""
    torch.manual_seed(0)
    model = AutoencoderDC(**DC_AE_F32C32_SANA)
    model.decoder = None  # training only encodes; keeping the decoder would inflate the online memory figure
    return FrozenVAE(model, source=ENCODER_NAME, device=device, precision=precision)


def online_setup(cfg: RevqConfig, device: torch.device, files: list[str], cache_path: str, batch_sizes: list[int]):
    """Encode every JPEG into the cache (timed: the encode pass; warms the encoder up), then the trainer."""
    start = sync(device)
    vae = build_encoder(device, cfg.vae.precision)
    build_s = sync(device) - start
    resolution, batch = cfg.data.resolution, max(batch_sizes)
    latents = torch.cat([vae.encode(load_images(files[i:i + batch], resolution)).cpu()
                         for i in range(0, len(files), batch)])  # (N, C, H, W)
    start = time.perf_counter()
    writer = CacheWriter.open(cache_path, num_inputs=len(files), latent_shape=vae.latent_shape(resolution),
                              split="train", vae_identity=vae.identity, image_recipe=recipe(resolution),
                              source=str(Path(files[0]).parent), chunk_size=cfg.encode.chunk_size,
                              latent_dtype=cfg.encode.latent_dtype)
    for u in range(writer.num_units):
        lo, hi = writer.unit_range(u)
        writer.write_unit(u, latents[lo:hi].numpy(), np.full(hi - lo, -1), [Path(f).name for f in files[lo:hi]])
    writer.finalize()
    write_s = time.perf_counter() - start
    cache = LatentCache.open(cache_path)
    parts = build_train_parts(cfg, LatentNormalizer(cache.mean, cache.std), cache.latent_shape, device)
    for b in batch_sizes:  # warm-up: optimizer state, allocator
        train_step(parts, latents[:b].to(device), single_process(device))
    params = sum(p.numel() for p in vae.model.parameters())
    info = {"encoder_params": params, "build_s": build_s, "write_s_per_sample": write_s / len(files),
            "encoder_precision": vae.precision}
    state = {"vae": vae, "parts": parts, "files": files, "resolution": resolution, "cursor": 0}
    return state, info


def online_iteration(state: dict, batch: int, device: torch.device) -> dict[str, float]:
    files = [state["files"][(state["cursor"] + i) % len(state["files"])] for i in range(batch)]
    state["cursor"] += batch
    t0 = sync(device)
    images = load_images(files, state["resolution"])  # (B, 3, R, R)
    t1 = sync(device)
    latents = state["vae"].encode(images)  # (B, C, H, W) float32 on the device
    t2 = sync(device)
    train_step(state["parts"], latents, single_process(device))
    t3 = sync(device)
    return {"decode": t1 - t0, "encode": t2 - t1, "step": t3 - t2}


# --- the cached way -------------------------------------------------------------------------------


def cached_setup(cfg: RevqConfig, device: torch.device, cache_path: str, batch_sizes: list[int]):
    """Load the split into memory on the device (timed), then the trainer."""
    start = sync(device)
    cache = LatentCache.open(cache_path)
    data = cache.load_latents(device)  # (N, C, H, W) in the stored dtype, as LatentSource keeps it
    load_s = sync(device) - start
    parts = build_train_parts(cfg, LatentNormalizer(cache.mean, cache.std), cache.latent_shape, device)
    state = {"data": data, "parts": parts, "generator": torch.Generator().manual_seed(0)}
    for b in batch_sizes:  # warm-up
        cached_iteration(state, b, device)
    info = {"load_s_per_sample": load_s / cache.num_samples, "num_samples": cache.num_samples,
            "dtype": str(data.dtype).removeprefix("torch."), "bytes_per_sample": data[0].numel() * data.element_size()}
    return state, info


def cached_iteration(state: dict, batch: int, device: torch.device) -> dict[str, float]:
    data = state["data"]
    # the epoch's permutation is drawn once per epoch in training; only the gather is per batch
    index = torch.randperm(len(data), generator=state["generator"])[:batch].to(device)
    t0 = sync(device)
    latents = data[index].float()  # (B, C, H, W)
    t1 = sync(device)
    train_step(state["parts"], latents, single_process(device))
    t2 = sync(device)
    return {"gather": t1 - t0, "step": t2 - t1}


# --- the worker processes and the parent that drives them ----------------------------------------


def worker(way: str, device_name: str, files: list[str], cache_path: str, batch_sizes: list[int], conn) -> None:
    """One way in its own process: set up, say ready, then one iteration per batch size received."""
    try:
        cfg, device = load_config(PRESET), resolve_device(device_name)
        if way == "online":
            state, info = online_setup(cfg, device, files, cache_path, batch_sizes)
        else:
            state, info = cached_setup(cfg, device, cache_path, batch_sizes)
        iteration = online_iteration if way == "online" else cached_iteration
        conn.send(("ready", info))
        while (batch := conn.recv()) is not None:
            reset_peak_memory(device)
            times = iteration(state, batch, device)
            conn.send(("result", {**times, "peak": peak_memory_bytes(device)}))
    except Exception:  # report it to the parent, which raises it with the worker's traceback
        conn.send(("error", traceback.format_exc()))


class Way:
    """A worker process running one way, driven over a pipe."""

    def __init__(self, way: str, *args) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = way
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker, args=(way, *args, child), daemon=True)
        self.process.start()
        self.info = self._receive()

    def run(self, batch: int) -> dict[str, float]:
        self.conn.send(batch)
        return self._receive()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()

    def _receive(self) -> dict:
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"the {self.name} worker failed:\n{payload}")
        return payload


def per_sample(results: list[dict], batch: int, *parts: str) -> list[float]:
    """Seconds per sample of each iteration, summed over the named parts."""
    return [sum(r[p] for p in parts) / batch for r in results]


def spread(values: list[float], fmt: str = ".4g") -> str:
    return " / ".join(f"{v:{fmt}}" for v in (min(values), statistics.median(values), max(values)))


def print_table(b: int, online: list[dict], cached: list[dict], memory: str) -> None:
    rows = [("decode + preprocess (JPEG)", None, per_sample(online, b, "decode")),
            ("DC-AE f32c32 encoder forward", None, per_sample(online, b, "encode")),
            ("cache gather (resident split)", per_sample(cached, b, "gather"), None),
            ("training step (train_step)", per_sample(cached, b, "step"), per_sample(online, b, "step")),
            ("total", per_sample(cached, b, "gather", "step"), per_sample(online, b, "decode", "encode", "step"))]
    print(f"\nbatch {b}: seconds per sample, min / median / max{'cached (ours)':>31}{'online (baseline)':>34}")
    for name, ours, base in rows:
        print(f"  {name:<58}{spread(ours) if ours else '-':>30}{spread(base) if base else '-':>34}")
    mib = [[r["peak"] / 2**20 for r in results] for results in (cached, online)]
    print(f"  {'peak memory, MiB (' + memory + ')':<58}{spread(mib[0], ',.0f'):>30}{spread(mib[1], ',.0f'):>34}")
    # each repeat ran both ways back to back, so its ratio sees one machine load; min / median / max of those
    ours = per_sample(cached, b, "gather", "step")
    serial = [t / o for t, o in zip(per_sample(online, b, "decode", "encode", "step"), ours)]
    hidden = [t / o for t, o in zip(per_sample(online, b, "encode", "step"), ours)]
    print(f"  per epoch, online / cached, paired by repeat: {spread(serial, '.1f')} "
          f"({spread(hidden, '.1f')} if loader workers hid all the decoding)")


def print_schedule(batch_sizes: list[int], results: dict, online_info: dict, cached_info: dict) -> None:
    print(f"\nthe whole schedule, seconds per sample: {EPOCHS} online epochs vs one encode pass (decode + encoder"
          f" + cache write {online_info['write_s_per_sample']:.2g} s) + loading the split "
          f"({cached_info['load_s_per_sample']:.2g} s) + {EPOCHS} cached epochs; medians")
    print(f"{'batch':>7}{'online':>12}{'encode pass':>14}{'cached':>12}{'online/cached':>15}"
          f"   {EPOCHS} epochs over {IMAGENET_TRAIN:,} images here: online / cached")
    for b in batch_sizes:
        online, cached = results["online"][b], results["cached"][b]
        encode_pass = statistics.median(per_sample(online, b, "decode", "encode")) + online_info["write_s_per_sample"]
        online_total = EPOCHS * statistics.median(per_sample(online, b, "decode", "encode", "step"))
        cached_total = (encode_pass + cached_info["load_s_per_sample"]
                        + EPOCHS * statistics.median(per_sample(cached, b, "gather", "step")))
        hours = [IMAGENET_TRAIN * t / 3600 for t in (online_total, cached_total)]
        print(f"{b:>7}{online_total:>12.2f}{encode_pass:>14.3f}{cached_total:>12.2f}"
              f"{online_total / cached_total:>14.1f}x   {hours[0]:,.0f} h / {hours[1]:,.0f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="4,8", help="comma-separated, e.g. 64,256 on a GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations of each way per batch size")
    parser.add_argument("--num-images", type=int, help="JPEG files (and cached latents); default: the largest batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = parser.parse_args()

    # --- setup: validate, then JPEGs on disk ---------------------------------------------------
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes={args.batch_sizes!r}: expected comma-separated positive ints, e.g. 4,8")
    num_images = args.num_images or max(batch_sizes)
    if min(batch_sizes) < 1 or args.repeats < 1 or num_images < max(batch_sizes):
        parser.error(f"need batch sizes >= 1, --repeats >= 1 and --num-images >= the largest batch; got "
                     f"{batch_sizes}, {args.repeats}, {num_images}")
    device = resolve_device(args.device)
    cfg = load_config(PRESET)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    memory = "max_memory_allocated" if device.type == "cuda" else "peak RSS of its process"
    with tempfile.TemporaryDirectory(prefix="bench_online_vs_cached_") as scratch:
        files = write_jpegs(Path(scratch) / "jpeg", num_images, cfg.data.resolution)
        jpeg_kib = sum(Path(f).stat().st_size for f in files) / len(files) / 1024
        print(f"device {device}{threads}, torch {torch.__version__}; {num_images} JPEGs {cfg.data.resolution}x"
              f"{cfg.data.resolution} ({jpeg_kib:.0f} KiB each) from the demo photographs; 512T: T="
              f"{cfg.quantizer.num_tokens}, K={cfg.quantizer.codebook_size:,}, rectifier {cfg.rectifier.width}x"
              f"{cfg.rectifier.depth}, step precision {cfg.train.precision}", flush=True)

        # --- the two ways, each in its own process; online first: it writes the cache ----------
        cache_path = str(Path(scratch) / "train.zarr")
        common = (args.device, files, cache_path, batch_sizes)
        online = Way("online", *common)
        cached = Way("cached", *common)
        print(f"encoder: {ENCODER_NAME}, {online.info['encoder_params'] / 1e6:.1f} M parameters, built in "
              f"{online.info['build_s']:.1f} s, precision {online.info['encoder_precision']}; cache: "
              f"{cached.info['num_samples']} latents, {cached.info['dtype']}, {cached.info['bytes_per_sample']:,} "
              f"bytes each, resident on {device}", flush=True)

        # --- timed iterations, interleaved: ways alternate, and which goes first alternates too --
        results = {"online": {b: [] for b in batch_sizes}, "cached": {b: [] for b in batch_sizes}}
        for repeat in range(args.repeats):
            for b in batch_sizes:
                for way in (online, cached) if repeat % 2 == 0 else (cached, online):
                    results[way.name][b].append(way.run(b))
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
        online.close()
        cached.close()

    # --- report -----------------------------------------------------------------------------------
    for b in batch_sizes:
        print_table(b, results["online"][b], results["cached"][b], memory)
    print_schedule(batch_sizes, results, online.info, cached.info)
    resident = IMAGENET_TRAIN * cached.info["bytes_per_sample"] / 1e9
    print(f"memory: the cached split here is {cached.info['num_samples']} latents; the ImageNet train split adds "
          f"{resident:.2f} GB ({cached.info['dtype']}) to the cached way's resident memory, the online way holds "
          "only its current batch of images")


if __name__ == "__main__":
    main()
