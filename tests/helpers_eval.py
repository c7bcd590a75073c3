"""A tiny trained-looking run for the evaluate / tokenize / tolerance tests.

    setup = make_eval_setup(tmp_path)   # tiny VAE, 12 images (+ 1 broken file), val cache, RUN/tokenizer

The tokenizer is built directly (no training): normalizer statistics from the encoded val cache,
codebooks sampled from its standardized latents, a small ViT rectifier nudged away from identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.metrics import InceptionOutput
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.config import RevqConfig, load_config
from revq_pipe.stages.encode import run_encode
from tests.helpers_vae import make_tiny_vae

RESOLUTION = 32
LATENT_CHANNELS = 4  # latents (4, 4, 4) at 32 px: 64 values
NUM_TOKENS, CODEBOOK_SIZE = 16, 8  # d = 4
NUM_GOOD_IMAGES = 12  # >= 10 so the Inception Score has an image in every split


@dataclass
class EvalSetup:
    cfg: RevqConfig
    run: Path
    images: Path
    cache: Path
    vae: Path


def write_images(root: Path, n: int = NUM_GOOD_IMAGES, seed: int = 0) -> Path:
    """Smooth random colour images of varied sizes in two class folders, plus one undecodable file."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (40, 48) if i % 2 else (48, 36)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-200, 200, size=(2, 3))
        pixels = base + yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.normal(0, 8, size=(h, w, 3))
        folder = root / ("cats" if i % 3 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    (root / "dogs" / "img_broken.png").write_bytes(b"this is not a png")  # the last input in order
    return root


def make_config(tmp_path: Path, vae: Path, images: Path, **settings) -> RevqConfig:
    values = {"paths.root": str(tmp_path / "artifacts"), "vae.source": str(vae), "vae.device": "cpu",
              "data.resolution": RESOLUTION, "data.val_images": str(images),
              "data.val_cache": str(tmp_path / "cache" / "val.zarr"), "train.run": str(tmp_path / "run"),
              "encode.num_workers": 0, "encode.batch_size": 16, "eval.batch_size": 16, "eval.grid_images": 4,
              "eval.num_workers": 0, "tokenize.batch_size": 16, "tokenize.num_workers": 0, "tolerance.limit": 8,
              "tolerance.batch_size": 16, "tolerance.num_workers": 0}
    values.update(settings)
    return load_config(None, [], values)


def make_eval_setup(tmp_path: Path) -> EvalSetup:
    vae = make_tiny_vae(tmp_path, latent_channels=LATENT_CHANNELS, image_size=RESOLUTION)
    images = write_images(tmp_path / "images")
    cfg = make_config(tmp_path, vae, images)
    run_encode(cfg, split="val", images=str(images), out=cfg.data.val_cache, overwrite=False)
    cache = LatentCache.open(cfg.data.val_cache)
    tokenizer = build_tokenizer(cache)
    run = Path(cfg.train.run)
    tokenizer.save_pretrained(run / "tokenizer")
    return EvalSetup(cfg=cfg, run=run, images=images, cache=Path(cfg.data.val_cache), vae=vae)


def build_tokenizer(cache: LatentCache, seed: int = 0) -> RevqTokenizer:
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(cache.latent_shape)
    normalizer = LatentNormalizer(cache.mean, cache.std)
    quantizer = MultiGroupQuantizer(shape, NUM_TOKENS, CODEBOOK_SIZE)
    tokens = quantizer.to_tokens(normalizer.normalize(cache.load_latents().float()))  # (N, T, d)
    quantizer.init_from_samples(tokens, method="sample", generator=generator)
    spec = RectifierSpec(kind="vit", width=16, depth=1, head_dim=8, residual=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rectifier = build_rectifier(spec, shape[0])
    with torch.no_grad():  # not the identity, so rectified and quantized latents differ
        for p in rectifier.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return RevqTokenizer(normalizer, quantizer, rectifier, rectifier_spec=spec,
                         vae_identity=cache.manifest.vae, image_recipe=cache.manifest.image)


class StandInInception(nn.Module):
    """A tiny fixed network with the FID Inception's interface: uint8 images -> features and logits."""

    feature_dim, num_classes = 6, 5
    weights_sha256 = "stand-in"

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.register_buffer("project", torch.randn(3 * 4 * 4, self.feature_dim, generator=generator))
        self.register_buffer("classify", torch.randn(self.feature_dim, self.num_classes, generator=generator))

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        pooled = nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)  # (B, 48)
        features = torch.tanh(pooled @ self.project)  # (B, 6)
        return InceptionOutput(features=features, logits=features @ self.classify)


class StandInLPIPS(nn.Module):
    """LPIPS's interface (two uint8 batches -> (B,) distances) without AlexNet: mean absolute difference."""

    weights_sha256 = {"stand-in": "stand-in"}

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.float() - b.float()).abs().mean(dim=(1, 2, 3)) / 255.0
