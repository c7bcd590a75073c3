"""A tiny random VAE for tests, written with save_pretrained so it loads like a real one.

    path = make_tiny_vae(tmp_path)              # AutoencoderDC, 64x64 images -> (32, 8, 8) latents
    vae = FrozenVAE.load(str(path), device="cpu")
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL

SPATIAL_COMPRESSION = 8  # three downsampling stages in both tiny configs


def tiny_vae_config(kind: str = "dc", latent_channels: int = 32) -> dict:
    """Constructor arguments of a tiny autoencoder (no attention, a few thousand parameters)."""
    if kind == "dc":
        return dict(
            latent_channels=latent_channels,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=(8, 16, 16, 32),
            decoder_block_out_channels=(8, 16, 16, 32),
            encoder_layers_per_block=(1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            encoder_qkv_multiscales=((), (), (), ()),
            decoder_qkv_multiscales=((), (), (), ()),
        )
    if kind == "kl":
        return dict(
            latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            mid_block_add_attention=False,
        )
    raise ValueError(f"kind={kind!r}: use 'dc' (AutoencoderDC) or 'kl' (AutoencoderKL)")


def make_tiny_vae(tmp_path: Path, latent_channels: int = 32, image_size: int = 64, *, kind: str = "dc",
                  seed: int = 0) -> Path:
    """Build a random tiny VAE, save it under tmp_path and return its folder.

    Latents of image_size x image_size images are (latent_channels, image_size/8, image_size/8).
    The weights depend only on (kind, latent_channels, seed), and the global RNG is left untouched.
    """
    if image_size % SPATIAL_COMPRESSION:
        raise ValueError(f"image_size={image_size} must be a multiple of {SPATIAL_COMPRESSION}")
    folder = Path(tmp_path) / f"tiny_vae_{kind}_c{latent_channels}_s{seed}"
    if (folder / "config.json").is_file():
        return folder
    model_class = AutoencoderDC if kind == "dc" else AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(**tiny_vae_config(kind, latent_channels))
    model.save_pretrained(folder)
    return folder
