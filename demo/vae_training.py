"""Training the demo's VAE: a small DC-AE (diffusers `AutoencoderDC`) fitted to the demo images.

The real pipeline wraps a pre-trained DC-AE f32c32 (256x256 images -> 32x8x8 latents). The
machines that build this project have no network, so the demo trains its own stand-in with the
same token geometry at 64x64 (spatial compression 8, 32 latent channels -> 32x8x8) and ships it
in `demo/vae/`. `revq-pipe demo train-vae` calls `train_demo_vae`, which reads top to bottom:
read the data, build the model, train, evaluate, save.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from revq_pipe.demo.images import IMAGE_SIZE
from revq_pipe.pipeline.files import atomic_directory
from revq_pipe.pipeline.images import to_model_range, to_uint8
from revq_pipe.pipeline.metrics import psnr_rgb
from revq_pipe.stages.console import log

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
SPATIAL_COMPRESSION = 8  # 64x64 images -> 8x8 latents

# Loss: pixel MSE + L1_WEIGHT * L1 + LATENT_SCALE_WEIGHT * (mean(z^2) - 1)^2.
L1_WEIGHT = 0.1
LATENT_SCALE_WEIGHT = 0.01
# Optimizer and schedule: AdamW, linear warm-up, cosine decay to FINAL_LR_FRACTION of the peak.
WEIGHT_DECAY = 1e-4
ADAM_BETAS = (0.9, 0.99)
GRAD_CLIP_NORM = 1.0
WARMUP_STEPS = 50  # at most; short runs warm up for a tenth of their steps
FINAL_LR_FRACTION = 0.05
FLIP_PROBABILITY = 0.5  # random horizontal flips, the only augmentation
LOG_EVERY = 50  # steps between log lines
EVAL_BATCH_SIZE = 64
RECIPE_FILE = "training_recipe.json"


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


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace files in `out_dir` (e.g. the committed demo/vae) unless told to."""
    if out_dir.is_file():
        raise FileExistsError(f"--out {out_dir} is a file; name a folder for the trained VAE")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (an earlier VAE?); caches and tokenizers made with a VAE "
                              "break when it is replaced. Pass --overwrite to replace it, or choose another --out")


def read_demo_data(images: Path, val_images: Path, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The train images (at least one batch) and, when the folder exists, the val images, uint8 (N, 3, 64, 64)."""
    train, _ = read_image_folder(images)
    if len(train) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(train)} train images in {images}; "
                         "use a smaller batch or more images")
    val = read_image_folder(val_images)[0] if val_images.is_dir() else None
    log(f"demo vae: {len(train)} train images from {images}, "
        f"{len(val) if val is not None else 0} val images from {val_images}")
    return train, val


def build_model(seed: int):
    """A freshly initialised AutoencoderDC with DEMO_VAE_CONFIG; `seed` fixes the initial weights."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(**DEMO_VAE_CONFIG)


def warmup_steps(steps: int) -> int:
    return min(WARMUP_STEPS, max(steps // 10, 1))


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = warmup_steps(steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def shuffled_batches(num_images: int, batch_size: int, generator: torch.Generator):
    """Endless batches of indices: each epoch a fresh permutation, its ragged tail dropped."""
    while True:
        order = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def demo_vae_loss(vae, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, pixel MSE, latents) for a [-1, 1] batch (B, 3, 64, 64).

    The latent term is a batch-level pull of the latents' RMS towards 1: the decoder can absorb
    any scale, and unit-scale latents keep the float16 cache and the later stages comfortable.
    """
    latents = vae.encode(batch).latent  # (B, 32, 8, 8)
    recon = vae.decode(latents).sample
    mse = F.mse_loss(recon, batch)
    loss = mse + L1_WEIGHT * F.l1_loss(recon, batch) + LATENT_SCALE_WEIGHT * (latents.pow(2).mean() - 1) ** 2
    return loss, mse, latents


def train_loop(vae, train: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
               log_every: int, start: float) -> None:
    """`steps` AdamW steps on random, randomly flipped batches of `train` (uint8 (N, 3, 64, 64))."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, betas=ADAM_BETAS)
    generator = torch.Generator().manual_seed(seed)  # batch order and flips
    batches = shuffled_batches(len(train), batch_size, generator)
    vae.train()
    running = []
    for step in range(steps):
        batch = to_model_range(train[next(batches)])  # (B, 3, 64, 64)
        flip = torch.rand(len(batch), generator=generator) < FLIP_PROBABILITY
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        loss, mse, latents = demo_vae_loss(vae, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP_NORM)
        optimizer.step()

        running.append(mse.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps} mse {np.mean(running):.5f} latent_rms {latents.pow(2).mean().sqrt():.3f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {(step + 1) * batch_size / elapsed:.1f} img/s")
            running = []
    vae.eval()


def bilinear_x8_baseline(images: torch.Tensor) -> torch.Tensor:
    """Context for the VAE's PSNR: Pillow bilinear down by 8 and back up, uint8 (B, 3, 64, 64)."""
    small = IMAGE_SIZE // SPATIAL_COMPRESSION
    out = []
    for img in images.permute(0, 2, 3, 1).numpy():
        pil = Image.fromarray(img).resize((small, small), Image.Resampling.BILINEAR)
        out.append(np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate(vae, val: torch.Tensor) -> dict:
    """Mean per-image RGB PSNR of the VAE and of the bilinear baseline on `val`, and latent statistics."""
    # The model is used directly (not FrozenVAE): it was just trained in memory and has no source to load.
    latents, reconstructions = [], []
    for batch in val.split(EVAL_BATCH_SIZE):
        latents.append(vae.encode(to_model_range(batch)).latent)
        reconstructions.append(to_uint8(vae.decode(latents[-1]).sample))
    latents = torch.cat(latents)
    return {
        "val_psnr_rgb": round(float(psnr_rgb(val, torch.cat(reconstructions)).mean()), 3),
        "val_bilinear_x8_psnr_rgb": round(float(psnr_rgb(val, bilinear_x8_baseline(val)).mean()), 3),
        "num_val": len(val),
        "val_latent_mean": round(float(latents.mean()), 4),
        "val_latent_std": round(float(latents.std()), 4),
    }


def training_recipe(*, num_params: int, images: Path, val_images: Path, num_train: int, steps: int,
                    batch_size: int, seed: int, lr: float) -> dict:
    """What `training_recipe.json` records besides the evaluation and the timings."""
    return {
        "model_class": "AutoencoderDC",
        "config": DEMO_VAE_CONFIG,
        "num_parameters": num_params,
        "latent_shape": [DEMO_VAE_CONFIG["latent_channels"], IMAGE_SIZE // SPATIAL_COMPRESSION,
                         IMAGE_SIZE // SPATIAL_COMPRESSION],
        "image_size": IMAGE_SIZE,
        "train_images": str(images),
        "val_images": str(val_images),
        "num_train": num_train,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": WEIGHT_DECAY, "betas": list(ADAM_BETAS),
                      "grad_clip": GRAD_CLIP_NORM,
                      "schedule": f"linear warm-up {warmup_steps(steps)} steps, cosine to {FINAL_LR_FRACTION} x lr"},
        "loss": {"mse": 1.0, "l1": L1_WEIGHT, "latent_scale": LATENT_SCALE_WEIGHT,
                 "latent_scale_term": "(mean(z^2) - 1)^2 over the batch"},
        "augmentation": "random horizontal flip",
        "psnr_protocol": "mean per-image RGB PSNR; reconstruction (x+1)/2 clamped to [0,1], rounded to 8 bits",
    }


def save_demo_vae(vae, out_dir: Path, recipe: dict) -> None:
    """Weights, config and recipe into `out_dir`, swapped in whole (a reader never sees a mix)."""
    with atomic_directory(out_dir) as tmp:
        vae.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")  # inside the atomic folder


def train_demo_vae(images: Path, out_dir: Path, *, steps: int = 1200, batch_size: int = 16, seed: int = 0,
                   lr: float = 2e-3, val_images: Path | None = None, log_every: int = LOG_EVERY,
                   overwrite: bool = False) -> dict:
    """Train the demo AutoencoderDC (64x64x3 -> 32x8x8) on a folder of demo images; save it.

    Args:
        images: the demo train folder (64x64 images anywhere below it, e.g. write_demo_images' `train/`).
        out_dir: receives `config.json` + `diffusion_pytorch_model.safetensors` (save_pretrained)
            and `training_recipe.json` (config, schedule, data counts, val PSNR, elapsed time).
        steps, batch_size, seed, lr: AdamW steps, images per step, the seed of the initial weights
            and of the batch order/flips, and the peak learning rate (warm-up, cosine to 5%).
        val_images: folder for the reported PSNR; default: the `val` folder beside `images`.
        log_every: steps between log lines.
        overwrite: replace a non-empty `out_dir`; without it that is an error, checked before training.

    Loss: see `demo_vae_loss`. Augmentation: random horizontal flips. CPU, deterministic for a
    given seed and thread count (reduction order depends on the thread count).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size} and lr={lr} must all be positive")
    images, out_dir = Path(images), Path(out_dir)
    val_images = Path(val_images) if val_images is not None else images.parent / "val"
    check_output_folder(out_dir, overwrite)
    start = time.perf_counter()

    # --- data and model -------------------------------------------------------------------------
    train, val = read_demo_data(images, val_images, batch_size)  # uint8 (N, 3, 64, 64)
    vae = build_model(seed)
    num_params = sum(p.numel() for p in vae.parameters())
    log(f"demo vae: AutoencoderDC with {num_params:,} parameters, {steps} steps of batch {batch_size}")

    # --- train ----------------------------------------------------------------------------------
    train_loop(vae, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every, start=start)
    train_seconds = time.perf_counter() - start

    # --- evaluate and save ----------------------------------------------------------------------
    if val is not None:
        evaluation = evaluate(vae, val)
    else:
        evaluation = {"val_psnr_rgb": None, "val_bilinear_x8_psnr_rgb": None, "num_val": 0,
                      "reason": f"no val folder at {val_images}"}
    recipe = {
        **training_recipe(num_params=num_params, images=images, val_images=val_images, num_train=len(train),
                          steps=steps, batch_size=batch_size, seed=seed, lr=lr),
        **evaluation,
        "train_seconds": round(train_seconds, 1),
        "elapsed_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    save_demo_vae(vae, out_dir, recipe)
    log(f"demo vae: saved to {out_dir}; val PSNR {evaluation['val_psnr_rgb']} dB "
        f"(bilinear x8 baseline {evaluation['val_bilinear_x8_psnr_rgb']} dB)")
    return {"out_dir": str(out_dir), "num_parameters": num_params, **evaluation,
            "train_seconds": recipe["train_seconds"], "elapsed_seconds": recipe["elapsed_seconds"]}
