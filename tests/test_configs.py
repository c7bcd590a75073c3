"""Every shipped preset parses and builds its model; the ImageNet presets are docs/method.md's table."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.stages.config import PRESETS, config_to_dict, load_config, preset_names

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in PRESETS.iterdir() if p.name.endswith(".yaml"))  # presets and their bases
IMAGENET = ("512T", "256T-B", "256T-L")
SIZE_KEYS = ("quantizer.num_tokens", "quantizer.codebook_size", "rectifier.width", "rectifier.depth", "train.run")


def method_table() -> dict[str, dict[str, float]]:
    """docs/method.md's preset table: {preset: {T, d, K, W, L, rectifier params, codebook params}}."""
    rows = {}
    for line in (REPO / "docs" / "method.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in IMAGENET:
            width, depth = (int(v) for v in cells[4].split(" x "))
            rows[cells[0]] = {"T": int(cells[1]), "d": int(cells[2]), "K": int(cells[3].replace(",", "")),
                              "W": width, "L": depth, "rectifier_M": float(cells[5].split()[0]),
                              "codebook_M": float(cells[6].split()[0])}
    return rows


def test_the_package_ships_the_repositorys_presets():
    assert SHIPPED == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert {"demo", *IMAGENET} <= set(preset_names()) and "_imagenet" not in preset_names()  # a base, not a preset


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_file_parses_and_builds_its_rectifier(name):
    cfg = load_config(PRESETS.joinpath(name))
    with torch.device("meta"):  # shapes only, no memory for the big presets
        rectifier = build_rectifier(cfg.rectifier, 32)
    assert sum(p.numel() for p in rectifier.parameters()) > 0
    assert "/path/to" not in PRESETS.joinpath(name).read_text()


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_presets_are_the_method_table(name):
    """Sizes and parameter counts as docs/method.md gives them (the paper's): a wrong width, depth, T or K shows."""
    row, cfg = method_table()[name], load_config(name)
    assert (cfg.quantizer.num_tokens, cfg.quantizer.codebook_size) == (row["T"], row["K"])
    assert (cfg.rectifier.width, cfg.rectifier.depth) == (row["W"], row["L"])
    with torch.device("meta"):
        rectifier = build_rectifier(cfg.rectifier, 32)
    params = sum(p.numel() for p in rectifier.parameters())
    assert round(params / 1e6, 2) == pytest.approx(row["rectifier_M"], abs=0.01), params
    latent = 32 * 8 * 8  # DC-AE f32c32 at 256 px, the VAE the presets name
    assert latent // cfg.quantizer.num_tokens == row["d"]
    assert cfg.quantizer.num_tokens * cfg.quantizer.codebook_size * row["d"] / 1e6 == \
        pytest.approx(row["codebook_M"], rel=5e-3)
    assert cfg.data.resolution == 256 and cfg.vae.source == "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"


def test_imagenet_presets_share_one_recipe_and_differ_only_in_their_sizes():
    """The paper's recipe (docs/method.md, "Training") lives in one base; each preset adds its sizes and run."""
    flat = {name: {f"{s}.{k}": v for s, values in config_to_dict(load_config(name)).items() for k, v in values.items()}
            for name in IMAGENET}
    for name in IMAGENET[1:]:
        run = flat[name]["train.run"]  # locations beside the run ("{run}/...") differ with it
        differing = {key for key, value in flat[name].items() if value != flat[IMAGENET[0]][key]
                     and not (isinstance(value, str) and value.startswith(run + "/"))}
        assert differing <= set(SIZE_KEYS), differing
    t = load_config("512T").train
    assert (t.epochs, t.batch_size, t.codebook_lr, t.codebook_weight_decay) == (100, 256, 1e-2, 0.0)
    assert (t.rectifier_lr, t.rectifier_weight_decay, t.final_lr_fraction, t.grad_clip) == (5e-4, 1e-4, 0.05, 1.0)
    assert t.precision == "fp32"
    for name in IMAGENET:
        assert PRESETS.joinpath(f"{name}.yaml").read_text().count("\n") < 12, "a preset holds its sizes, not a copy"


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_locations_follow_the_root(name, tmp_path):
    cfg = load_config(name, [f"paths.root={tmp_path}"])
    assert cfg.train.run == str(tmp_path / "runs" / name)
    assert cfg.data.train_cache == str(tmp_path / "imagenet/cache/train.zarr")
    assert cfg.data.val_images == str(tmp_path / "imagenet/val")
    assert cfg.tokenize.out == str(tmp_path / "runs" / name / "tokens/{split}.zarr")
    assert math.prod((32, 8, 8)) % cfg.quantizer.num_tokens == 0


def test_the_demo_preset_names_the_built_in_defaults():
    assert not re.search(r"^\w", PRESETS.joinpath("demo.yaml").read_text(), re.M), "comments only"
    assert config_to_dict(load_config("demo")) == config_to_dict(load_config())
