"""Every shipped preset parses, builds its rectifier, and the paper presets carry docs/method.md's numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.stages.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
# preset: (tokens T, codebook K, rectifier width, depth), from docs/method.md's table
PAPER = {"512T": (512, 16384, 512, 3), "256T-B": (256, 65536, 1024, 4), "256T-L": (256, 262144, 512, 4)}


def test_the_expected_presets_ship():
    assert {p.stem for p in PRESETS} >= {"demo", *PAPER}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_and_builds_its_rectifier(preset):
    cfg = load_config(preset)
    spec = RectifierSpec(**dataclasses.asdict(cfg.rectifier))
    with torch.device("meta"):  # shapes only, no memory for the big presets
        rectifier = build_rectifier(spec, 32)
    assert sum(p.numel() for p in rectifier.parameters()) > 0
    assert (32 * 8 * 8) % cfg.quantizer.num_tokens == 0, "tokens must tile a 32x8x8 latent"
    assert "{root}" not in cfg.train.run and "/path/to" not in preset.read_text()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_follow_the_method(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    tokens, codes, width, depth = PAPER[name]
    assert (cfg.quantizer.num_tokens, cfg.quantizer.codebook_size) == (tokens, codes)
    assert (cfg.rectifier.kind, cfg.rectifier.width, cfg.rectifier.depth, cfg.rectifier.head_dim) == \
        ("vit", width, depth, 32)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.codebook_lr, t.codebook_weight_decay) == (100, 256, 1e-2, 0.0)
    assert (t.rectifier_lr, t.rectifier_weight_decay, t.final_lr_fraction, t.grad_clip) == (5e-4, 1e-4, 0.05, 1.0)
    assert cfg.quantizer.reset and (cfg.quantizer.reset_fraction, cfg.quantizer.reset_noise) == (0.2, 0.1)
    assert cfg.data.resolution == 256 and cfg.vae.source == "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
    assert t.run.endswith(f"runs/{name}")


def test_demo_preset_fits_the_demo_cache():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.quantizer.codebook_size <= 2048, "the demo cache holds ~2048 training latents"
    assert cfg.train.batch_size <= 2048
