"""The embedded demo: small train/val image sets cut from the photographs that ship with
scikit-image, and a small DC-AE (diffusers `AutoencoderDC`) trained on them.

The real pipeline wraps a pre-trained DC-AE f32c32 (256x256 images -> 32x8x8 latents). The
machines that build this project have no network, so the demo trains its own stand-in with
the same token geometry at 64x64 (spatial compression 8, 32 latent channels -> 32x8x8) and
ships it in `demo/vae/`. Both functions take plain arguments so the CLI
(`revq-pipe demo images`, `revq-pipe demo train-vae`) can call them directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from revq_pipe.stages.console import log

# ---------------------------------------------------------------------------------------------
# Demo images
# ---------------------------------------------------------------------------------------------

# The colour photographs in skimage's data folder (no download needed). Synthetic images
# (color.png, chessboard_RGB.png, phantom.png) and the near-duplicate motorcycle_right.png are
# left out. Sorted, so label = index = the class's position among the sorted folder names.
DEMO_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
    "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
)
IMAGE_SIZE = 64
TRAIN_FRACTION = 0.75  # rows above this line of a photograph give train crops, rows below give val crops
SPLITS = ("train", "val")
SHARDS_PER_SPLIT = 4
IMAGES_FORMAT = "revq-demo-images"
IMAGES_FORMAT_VERSION = 1
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}  # fixed: same bytes every run


def skimage_data_dir() -> Path:
    """scikit-image's bundled data folder, located without importing (or downloading) anything."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the demo images are cut from photographs shipped with scikit-image, which is not installed; "
            "install it with `pip install 'revq-pipe[demo]'` (or `pip install scikit-image`)")
    return Path(spec.origin).parent / "data"


def load_demo_photos() -> dict[str, Image.Image]:
    """{class name: RGB photograph} for DEMO_PHOTOS, in label order."""
    data_dir = skimage_data_dir()
    photos = {}
    for file_name in DEMO_PHOTOS:
        path = data_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"demo photograph {path} is missing from this scikit-image install; "
                                    "reinstall scikit-image (its wheel ships these files)")
        with Image.open(path) as img:
            photos[Path(file_name).stem] = img.convert("RGB")
    return photos


def split_rows(height: int, split: str) -> tuple[int, int]:
    """Row range [top, bottom) of a photograph that `split` may crop from; train and val never overlap."""
    border = int(height * TRAIN_FRACTION)
    return (0, border) if split == "train" else (border, height)


def sample_crop_boxes(size: tuple[int, int], split: str, count: int, *, seed: int, label: int) -> list[list[int]]:
    """`count` random square boxes [left, top, right, bottom] inside the split's rows of a photo.

    Side s is uniform in [IMAGE_SIZE, min(photo dims)//2], capped by the split's region, so every
    crop lies wholly inside its region. The generator depends on (seed, label, split) only, so the
    first n boxes do not change when `count` grows.
    """
    width, height = size
    top, bottom = split_rows(height, split)
    max_side = min(min(width, height) // 2, bottom - top, width)
    if max_side < IMAGE_SIZE:
        raise ValueError(f"photograph {label} ({width}x{height}) has a {split} region too small for "
                         f"{IMAGE_SIZE}px crops")
    rng = np.random.default_rng([seed, label, SPLITS.index(split)])
    boxes = []
    for _ in range(count):
        side = int(rng.integers(IMAGE_SIZE, max_side + 1))
        left = int(rng.integers(0, width - side + 1))
        y = int(rng.integers(top, bottom - side + 1))
        boxes.append([left, y, left + side, y + side])
    return boxes


def encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def tree_sha256(root: Path, relative_paths: list[str]) -> str:
    """One hash over the names and bytes of the given files, in sorted order."""
    digest = hashlib.sha256()
    for rel in sorted(relative_paths):
        digest.update(rel.encode() + b"\0")
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()


def demo_images_summary(out_dir: Path, manifest: dict, reused: bool) -> dict:
    return {
        "out_dir": str(out_dir),
        "train_shards": str(out_dir / "shards" / "train-*.tar"),
        "val_shards": str(out_dir / "shards" / "val-*.tar"),
        "train_folder": str(out_dir / "train"),
        "val_folder": str(out_dir / "val"),
        "num_train": manifest["counts"]["train"],
        "num_val": manifest["counts"]["val"],
        "classes": manifest["classes"],
        "manifest": str(out_dir / "manifest.json"),
        "reused": reused,
    }


def existing_demo_images(out_dir: Path, request: dict) -> dict | None:
    """The manifest of a complete, unmodified earlier run with the same request, else None."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if any(manifest.get(k) != v for k, v in request.items()):
        return None
    files = manifest.get("files", [])
    if not all((out_dir / rel).is_file() for rel in files):
        return None
    return manifest if tree_sha256(out_dir, files) == manifest.get("sha256") else None


def write_split(root: Path, split: str, samples: list[tuple[str, str, int, bytes]], num_shards: int) -> list[str]:
    """Write one split as webdataset shards and as an ImageFolder tree; return relative file paths."""
    import webdataset as wds

    written = []
    for key, class_name, _, png in samples:
        rel = f"{split}/{class_name}/{key}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png)
        written.append(rel)
    (root / "shards").mkdir(exist_ok=True)
    per_shard = math.ceil(len(samples) / num_shards)
    for shard in range(num_shards):
        rel = f"shards/{split}-{shard:06d}.tar"
        # mtime fixed and encoder off (we hand over bytes): identical tar bytes on every run.
        with wds.TarWriter(str(root / rel), encoder=False, mtime=0) as sink:
            for key, _, label, png in samples[shard * per_shard:(shard + 1) * per_shard]:
                sink.write({"__key__": key, "png": png, "cls": str(label).encode()})
        written.append(rel)
    return written


def write_demo_images(out_dir: Path, *, seed: int = 0, train_per_photo: int = 256,
                      val_per_photo: int = 64) -> dict:
    """Write the demo's deterministic 64x64 RGB train/val crops; skip if already there.

    Args:
        out_dir: target folder. Gets `shards/{train,val}-00000k.tar` (webdataset: `<key>.png`,
            `<key>.cls` = the label as text), ImageFolder trees `train/<photo>/<key>.png` and
            `val/<photo>/<key>.png` (the same PNG bytes), and `manifest.json` (request, crop
            boxes, file list and a sha256 over all files), written last.
        seed: crop positions and sizes, and the sample order inside the shards.
        train_per_photo, val_per_photo: crops per photograph and split (8 photographs).

    Train crops come from the top 75% of each photograph's rows and val crops from the bottom
    25%, so no val pixel is ever seen in training. Keys are `<photo>_<index:05d>`; label = the
    photograph's index in DEMO_PHOTOS (= sorted class folder order). Same seed -> same bytes
    (on the same Pillow/zlib build; JPEG decoding may differ between libjpeg versions).
    Returns a dict of paths (shard globs, folders, manifest) and counts.
    """
    out_dir = Path(out_dir)
    if train_per_photo < 1 or val_per_photo < 1:
        raise ValueError(f"train_per_photo={train_per_photo} and val_per_photo={val_per_photo} must be >= 1")
    per_photo = {"train": train_per_photo, "val": val_per_photo}
    request = {"format": IMAGES_FORMAT, "format_version": IMAGES_FORMAT_VERSION, "seed": seed,
               "image_size": IMAGE_SIZE, "per_photo": per_photo}
    manifest = existing_demo_images(out_dir, request)
    if manifest is not None:
        log(f"demo images: {out_dir} is up to date ({manifest['counts']}), nothing to do")
        return demo_images_summary(out_dir, manifest, reused=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no demo manifest.json; "
                              "pass an empty or new folder, or delete it")

    # --- cut the crops ------------------------------------------------------------------------
    photos = load_demo_photos()
    classes = list(photos)
    crops: dict[str, dict[str, list[int]]] = {}
    samples: dict[str, list[tuple[str, str, int, bytes]]] = {}
    for split in SPLITS:
        crops[split], samples[split] = {}, []
        for label, (name, photo) in enumerate(photos.items()):
            boxes = sample_crop_boxes(photo.size, split, per_photo[split], seed=seed, label=label)
            for index, box in enumerate(boxes):
                key = f"{name}_{index:05d}"
                crop = photo.crop(tuple(box)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                crops[split][key] = box
                samples[split].append((key, name, label, encode_png(crop)))
        # Mix the photographs across shards so any one shard holds every class.
        order = np.random.default_rng([seed, len(SPLITS) + SPLITS.index(split)]).permutation(len(samples[split]))
        samples[split] = [samples[split][i] for i in order]

    # --- write into a scratch folder, then swap it in (a crash never leaves a half-written set) --
    scratch = out_dir.resolve().with_name(f".{out_dir.resolve().name}.partial")
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    files = []
    for split in SPLITS:
        files += write_split(scratch, split, samples[split], min(SHARDS_PER_SPLIT, len(samples[split])))
    manifest = {
        **request,
        "source": "scikit-image data folder",
        "photos": {name: {"file": f, "label": i, "size": list(photos[name].size)}
                   for i, (name, f) in enumerate(zip(classes, DEMO_PHOTOS))},
        "classes": classes,
        "train_rows_fraction": TRAIN_FRACTION,
        "resize": "Pillow bilinear (antialiased) from a square crop of side in [64, min(photo dims)//2]",
        "counts": {split: len(samples[split]) for split in SPLITS},
        "crop_boxes": crops,  # {split: {key: [left, top, right, bottom]}} in photo pixels
        "files": sorted(files),
        "sha256": tree_sha256(scratch, files),
    }
    (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)  # empty, or an earlier demo set with another request
    scratch.rename(out_dir)
    log(f"demo images: wrote {manifest['counts']} crops of {len(classes)} photographs to {out_dir}")
    return demo_images_summary(out_dir, manifest, reused=False)


# ---------------------------------------------------------------------------------------------
# Demo VAE
# ---------------------------------------------------------------------------------------------

# 64x64x3 -> 32x8x8: four stages (2^(4-1) = 8x downsampling). As in the released DC-AE configs
# the first stage has no blocks, so conv_in itself downsamples (pixel-unshuffle) and the
# full-resolution work is one 3x3 conv; its channel entry (16) is then unused. ResBlocks at
# 32x32 (32 ch) and 16x16 (64 ch), one EfficientViTBlock (linear attention, multiscale (5,),
# 128 ch) at the 8x8 latent resolution; the decoder is deeper than the encoder, as in DC-AE.
# Sized for CPU training in minutes (~1.4 M parameters, ~5.5 MB of float32 safetensors).
DEMO_VAE_CONFIG = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [16, 32, 64, 128],
    "decoder_block_out_channels": [16, 32, 64, 128],
    "encoder_layers_per_block": [0, 1, 1, 1],
    "decoder_layers_per_block": [0, 2, 2, 1],
    "encoder_qkv_multiscales": [[], [], [], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5]],
}
L1_WEIGHT = 0.1
LATENT_SCALE_WEIGHT = 0.01
WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.05


def read_image_folder(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """All `*.png` / `*.jpg` under `folder` (sorted) as uint8 (N, 3, 64, 64), and their relative paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; write the demo images first "
                                "(`revq-pipe demo images`)")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise FileNotFoundError(f"no .png/.jpg images under {folder}")
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{path} is {img.size[0]}x{img.size[1]}; the demo VAE trains on "
                                 f"{IMAGE_SIZE}x{IMAGE_SIZE} images (the output of write_demo_images)")
            images[i] = np.asarray(img.convert("RGB"))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [str(p.relative_to(folder)) for p in paths]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def psnr_rgb(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Mean over images of RGB PSNR (dB) between uint8 images and [-1, 1] reconstructions.

    Reconstructions are mapped with (x + 1) / 2, clamped to [0, 1] and rounded to 8 bits first.
    """
    rec = ((reconstructions + 1) / 2).clamp(0, 1).mul(255).round()
    mse = (rec - images.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
    return float((10 * torch.log10(255.0 ** 2 / mse)).mean())


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Encode and decode uint8 images in batches; returns float [-1, 1]-ish reconstructions."""
    outputs = [vae.decode(vae.encode(to_model_range(images[i:i + batch_size])).latent).sample
               for i in range(0, len(images), batch_size)]
    return torch.cat(outputs)


def bilinear_x8_baseline(images: torch.Tensor) -> torch.Tensor:
    """Context for the VAE's PSNR: Pillow bilinear down by 8 and back up, as [-1, 1] floats."""
    small = IMAGE_SIZE // 8
    out = []
    for img in images.permute(0, 2, 3, 1).numpy():
        pil = Image.fromarray(img).resize((small, small), Image.Resampling.BILINEAR)
        out.append(np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)))
    return to_model_range(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2))


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = min(WARMUP_STEPS, max(steps // 10, 1))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_demo_vae(images: Path, out_dir: Path, *, steps: int = 1200, batch_size: int = 16, seed: int = 0,
                   lr: float = 2e-3, val_images: Path | None = None, log_every: int = 50) -> dict:
    """Train the demo AutoencoderDC (64x64x3 -> 32x8x8) on a folder of demo images; save it.

    Args:
        images: the demo train folder (64x64 images anywhere below it, e.g. write_demo_images' `train/`).
        out_dir: receives `config.json` + `diffusion_pytorch_model.safetensors` (save_pretrained)
            and `training_recipe.json` (config, schedule, data counts, val PSNR, elapsed time).
        steps, batch_size, seed, lr: AdamW steps, images per step, the seed of the initial weights
            and of the batch order/flips, and the peak learning rate (warm-up, cosine to 5%).
        val_images: folder for the reported PSNR; default: the `val` folder beside `images`.
        log_every: steps between log lines.

    Loss: pixel MSE + 0.1 * L1, plus 0.01 * (mean(z^2) - 1)^2, a batch-level pull of the latents'
    RMS towards 1: the decoder can absorb any scale, and unit-scale latents keep the float16 cache
    and the later stages numerically comfortable. Augmentation: random horizontal flips. CPU,
    deterministic for a given seed and thread count (reduction order depends on the thread count).
    """
    from diffusers import AutoencoderDC

    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size} and lr={lr} must all be positive")
    images = Path(images)
    val_images = Path(val_images) if val_images is not None else images.parent / "val"
    start = time.perf_counter()

    # --- data -----------------------------------------------------------------------------------
    train, _ = read_image_folder(images)  # (N, 3, 64, 64) uint8
    val = read_image_folder(val_images)[0] if val_images.is_dir() else None
    log(f"demo vae: {len(train)} train images from {images}, "
        f"{len(val) if val is not None else 0} val images from {val_images}")

    # --- model ----------------------------------------------------------------------------------
    torch.manual_seed(seed)
    vae = AutoencoderDC(**DEMO_VAE_CONFIG)
    num_params = sum(p.numel() for p in vae.parameters())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(seed)
    log(f"demo vae: AutoencoderDC with {num_params:,} parameters, {steps} steps of batch {batch_size}")

    # --- loop -----------------------------------------------------------------------------------
    vae.train()
    order, cursor, running = torch.randperm(len(train), generator=generator), 0, []
    for step in range(steps):
        if cursor + batch_size > len(order):  # new epoch (drop the ragged tail)
            order, cursor = torch.randperm(len(train), generator=generator), 0
        batch = to_model_range(train[order[cursor:cursor + batch_size]])  # (B, 3, 64, 64)
        cursor += batch_size
        flip = torch.rand(len(batch), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        latents = vae.encode(batch).latent  # (B, 32, 8, 8)
        recon = vae.decode(latents).sample
        mse = F.mse_loss(recon, batch)
        loss = mse + L1_WEIGHT * F.l1_loss(recon, batch) + LATENT_SCALE_WEIGHT * (latents.pow(2).mean() - 1) ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()

        running.append(mse.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps} mse {np.mean(running):.5f} latent_rms {latents.pow(2).mean().sqrt():.3f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {(step + 1) * batch_size / elapsed:.1f} img/s")
            running = []
    train_seconds = time.perf_counter() - start

    # --- evaluate and save ----------------------------------------------------------------------
    vae.eval()
    evaluation: dict = {"val_psnr_rgb": None, "val_bilinear_x8_psnr_rgb": None, "num_val": 0}
    if val is not None:
        with torch.no_grad():
            latents = torch.cat([vae.encode(to_model_range(val[i:i + 64])).latent for i in range(0, len(val), 64)])
        evaluation = {
            "val_psnr_rgb": round(psnr_rgb(val, reconstruct(vae, val)), 3),
            "val_bilinear_x8_psnr_rgb": round(psnr_rgb(val, bilinear_x8_baseline(val)), 3),
            "num_val": len(val),
            "val_latent_mean": round(float(latents.mean()), 4),
            "val_latent_std": round(float(latents.std()), 4),
        }
    else:
        evaluation["reason"] = f"no val folder at {val_images}"
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir)
    recipe = {
        "model_class": "AutoencoderDC",
        "config": DEMO_VAE_CONFIG,
        "num_parameters": num_params,
        "latent_shape": [DEMO_VAE_CONFIG["latent_channels"], IMAGE_SIZE // 8, IMAGE_SIZE // 8],
        "image_size": IMAGE_SIZE,
        "train_images": str(images),
        "val_images": str(val_images),
        "num_train": len(train),
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": 1e-4, "betas": [0.9, 0.99], "grad_clip": 1.0,
                      "schedule": f"linear warm-up {min(WARMUP_STEPS, max(steps // 10, 1))} steps, "
                                  f"cosine to {FINAL_LR_FRACTION} x lr"},
        "loss": {"mse": 1.0, "l1": L1_WEIGHT, "latent_scale": LATENT_SCALE_WEIGHT,
                 "latent_scale_term": "(mean(z^2) - 1)^2 over the batch"},
        "augmentation": "random horizontal flip",
        "psnr_protocol": "mean per-image RGB PSNR; reconstruction (x+1)/2 clamped to [0,1], rounded to 8 bits",
        **evaluation,
        "train_seconds": round(train_seconds, 1),
        "elapsed_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    (out_dir / "training_recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    log(f"demo vae: saved to {out_dir}; val PSNR {evaluation['val_psnr_rgb']} dB "
        f"(bilinear x8 baseline {evaluation['val_bilinear_x8_psnr_rgb']} dB)")
    return {"out_dir": str(out_dir), "num_parameters": num_params, **evaluation,
            "train_seconds": recipe["train_seconds"], "elapsed_seconds": recipe["elapsed_seconds"]}
