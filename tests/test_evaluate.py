"""`revq-pipe eval`: the report contract, null metrics with reasons, FID plumbing, latent-level evaluation."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revq_pipe.pipeline.metrics import frechet_distance, psnr_rgb
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages import eval_metrics
from revq_pipe.stages.datasets import open_image_dataset
from revq_pipe.stages.datasets import DecodedImages
from revq_pipe.stages.evaluate import FROM_CACHE_REASON, run_evaluate
from tests.helpers_eval import (CODEBOOK_SIZE, NUM_GOOD_IMAGES, NUM_TOKENS, RESOLUTION, StandInInception,
                                StandInLPIPS, make_config)
from tests.helpers_processes import Ranks
from tests.helpers_vae import make_tiny_vae

REPO = Path(__file__).resolve().parents[1]
IMAGE_METRICS = ("rfid", "inception_score", "psnr", "psnr_y", "ssim", "lpips")
REPORT_FIELDS = ("num_images", *IMAGE_METRICS, "latent_mse", "latent_mse_quantized", "codebook_usage", "perplexity",
                 "bits_per_image", "vae_ceiling", "missing", "protocol", "tokenizer", "vae", "elapsed_s")


@pytest.fixture(autouse=True)
def no_weights_from_env(monkeypatch):
    monkeypatch.delenv("REVQ_FID_WEIGHTS", raising=False)
    monkeypatch.delenv("REVQ_LPIPS_WEIGHTS", raising=False)


def test_report_without_metric_weights(eval_setup):
    report = run_evaluate(eval_setup.cfg, run=str(eval_setup.run), split="val", images=None, from_cache=False)
    assert json.loads((eval_setup.run / "eval_val.json").read_text()) == report
    assert (eval_setup.run / "eval_val.config.yaml").is_file()
    for field in REPORT_FIELDS:
        assert field in report, field
    assert report["num_images"] == NUM_GOOD_IMAGES
    skipped = report["protocol"]["skipped"]
    assert skipped["count"] == 1 and skipped["keys"] == ["dogs/img_broken.png"]
    for scope in (report, report["vae_ceiling"]):
        assert scope["rfid"] is None and scope["inception_score"] is None and scope["lpips"] is None
        assert 0 < scope["psnr"] < 100 and 0 < scope["psnr_y"] < 100 and -1 <= scope["ssim"] <= 1
    for metric in ("rfid", "inception_score", "lpips", "vae_ceiling.rfid", "vae_ceiling.lpips"):
        assert "--fid-weights" in report["missing"][metric] or "--lpips-weights" in report["missing"][metric]
    assert report["latent_mse"] >= 0 and report["latent_mse_quantized"] > 0
    assert report["latent_mse"] != report["latent_mse_quantized"]
    assert 0 < report["codebook_usage"] <= 1 and 1 <= report["perplexity"] <= CODEBOOK_SIZE
    assert report["bits_per_image"] == NUM_TOKENS * math.log2(CODEBOOK_SIZE)
    protocol = report["protocol"]
    assert protocol["resolution"] == RESOLUTION and protocol["rounding"] == "clamp [0,1], round to 8 bit"
    assert protocol["fid_weights_sha256"] is None and "red channel" in protocol["psnr_note"]
    assert protocol["tokenizer_precision"] == "ieee float32 (no autocast, no TF32)"
    assert report["vae"]["weights_sha256"] == FrozenVAE.load(str(eval_setup.vae), device="cpu").identity["weights_sha256"]
    assert len(report["tokenizer"]["model_sha256"]) == 64
    assert (eval_setup.run / "eval_val_grid.png").is_file() and (eval_setup.run / "eval_val_usage.png").is_file()


def test_grid_tiles_are_upscaled_and_labelled_with_their_psnr(eval_setup):
    """The 32 px tiles are shown 4x by nearest neighbour; every reconstruction carries its PSNR, which the report
    lists with the image's key."""
    report = run_evaluate(eval_setup.cfg, run=str(eval_setup.run), split="val", images=None, from_cache=False)
    vae = FrozenVAE.load(str(eval_setup.vae), device="cpu")
    tokenizer = RevqTokenizer.from_pretrained(eval_setup.run / "tokenizer", vae=vae, device="cpu")
    dataset = open_image_dataset(eval_setup.images)
    decoded = [DecodedImages(dataset, RESOLUTION)[i] for i in range(4)]  # the grid's 4 images, in order
    rec = tokenizer.reconstruct(torch.stack([x for _, x, _ in decoded]))
    grid = report["grid"]
    assert grid["file"] == "eval_val_grid.png" and [g["key"] for g in grid["images"]] == [dataset.key(i) for i in range(4)]
    assert [g["psnr_tokenizer"] for g in grid["images"]] == pytest.approx(psnr_rgb(rec.original, rec.tokenizer).tolist())
    assert [g["psnr_vae"] for g in grid["images"]] == pytest.approx(psnr_rgb(rec.original, rec.vae).tolist())

    picture = np.asarray(Image.open(eval_setup.run / grid["file"]).convert("RGB"))  # (H, W, 3)
    side, gap = 4 * RESOLUTION, 2
    margin = picture.shape[1] - (4 * side + 3 * gap)  # 4 columns after the row labels
    first = rec.original[0].permute(1, 2, 0).numpy().repeat(4, axis=0).repeat(4, axis=1)  # nearest neighbour
    assert margin > 20 and np.array_equal(picture[:side, margin:margin + side], first)
    caption_rows = picture.shape[0] - 3 * side - 2 * gap  # two caption lines: under the VAE and tokenizer rows
    assert caption_rows > 2 * 8
    under_tokenizer = picture[-caption_rows // 2:, margin:margin + side]
    assert (under_tokenizer < 128).any(), "the tokenizer tile's caption is written"
    under_original = picture[side:side + gap, margin:margin + side]
    assert (under_original == 255).all(), "the originals carry no caption"


def test_usage_map_paints_each_positions_usage_over_the_latent_layout(eval_setup):
    from revq_pipe.stages.grid import usage_per_element

    tokenizer = RevqTokenizer.from_pretrained(eval_setup.run / "tokenizer", device="cpu")
    usage = torch.linspace(0, 1, tokenizer.num_tokens)
    painted = usage_per_element(usage, tokenizer.latent_shape).reshape(-1)  # (C*H*W,) in (C, H, W) order
    for token in tokenizer.token_layout():
        assert (painted[token["flat_start"]:token["flat_stop"]] == usage[token["position"]].item()).all()
    report = run_evaluate(eval_setup.cfg, run=str(eval_setup.run), split="val", images=None, from_cache=True)
    picture = Image.open(eval_setup.run / "eval_val_latents_usage.png")
    assert picture.format == "PNG" and picture.size[0] > 200 and report["codebook_usage"] > 0


def test_eval_reads_its_own_settings_not_encodes(eval_setup):
    """eval decodes with eval.num_workers; an encode.num_workers no DataLoader accepts does not reach it."""
    cfg = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"encode.num_workers": -1, "eval.num_workers": 0,
                                                                      "eval.limit": 2})
    assert run_evaluate(cfg, run=str(eval_setup.run), split="val", images=None, from_cache=False)["num_images"] == 2
    with pytest.raises(ValueError, match="num_workers"):
        run_evaluate(make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"eval.num_workers": -1}),
                     run=str(eval_setup.run), split="val", images=None, from_cache=False)


def test_fid_is_and_lpips_plumbing_with_stand_in_networks(eval_setup, monkeypatch):
    stand_in = StandInInception()
    monkeypatch.setattr(eval_metrics, "try_load_fid_inception", lambda path, device: (stand_in, None))
    monkeypatch.setattr(eval_metrics, "try_load_lpips", lambda path, device: (StandInLPIPS(), None))
    report = run_evaluate(eval_setup.cfg, run=str(eval_setup.run), split="val", images=None, from_cache=False)
    for scope in (report, report["vae_ceiling"]):
        for metric in IMAGE_METRICS:
            assert isinstance(scope[metric], float) and math.isfinite(scope[metric]), metric
    assert not any(k.split(".")[-1] in ("rfid", "inception_score", "lpips") for k in report["missing"])
    assert report["protocol"]["fid_weights_sha256"] == "stand-in"

    # the same FID from the features of the reconstructions, computed with numpy's covariance
    vae = FrozenVAE.load(str(eval_setup.vae), device="cpu")
    tokenizer = RevqTokenizer.from_pretrained(eval_setup.run / "tokenizer", vae=vae, device="cpu")
    dataset = open_image_dataset(eval_setup.images)
    decoded = [DecodedImages(dataset, RESOLUTION)[i] for i in range(len(dataset))]
    images = torch.stack([x for _, x, _ in decoded if x is not None])  # one batch, as the evaluation saw it
    rec = tokenizer.reconstruct(images)
    real, fake = (stand_in(x).features.double().numpy() for x in (rec.original, rec.tokenizer))
    expected = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert report["rfid"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    lpips = StandInLPIPS()(rec.original, rec.vae).double().mean().item()
    assert report["vae_ceiling"]["lpips"] == pytest.approx(lpips, rel=1e-6)


def test_latent_level_evaluation_from_cache(eval_setup):
    report = run_evaluate(eval_setup.cfg, run=str(eval_setup.run), split="val", images=None, from_cache=True)
    for field in REPORT_FIELDS:
        assert field in report, field
    assert report["num_images"] == NUM_GOOD_IMAGES
    for metric in IMAGE_METRICS:
        assert report[metric] is None and report["vae_ceiling"][metric] is None
        assert report["missing"][metric] == FROM_CACHE_REASON
        assert report["missing"][f"vae_ceiling.{metric}"] == FROM_CACHE_REASON
    assert report["latent_mse"] >= 0 and report["latent_mse_quantized"] > 0
    assert 0 < report["codebook_usage"] <= 1 and report["perplexity"] >= 1
    assert report["bits_per_image"] == NUM_TOKENS * math.log2(CODEBOOK_SIZE)


def test_limit_and_a_foreign_vae_are_handled(eval_setup, tmp_path):
    limited = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"eval.limit": 5})
    assert run_evaluate(limited, run=str(eval_setup.run), split="val", images=None, from_cache=False)["num_images"] == 5
    other = make_tiny_vae(tmp_path, latent_channels=4, image_size=RESOLUTION, seed=1)
    foreign = make_config(eval_setup.run.parent, other, eval_setup.images)
    with pytest.raises(ValueError, match="weights sha256"):
        run_evaluate(foreign, run=str(eval_setup.run), split="val", images=None, from_cache=False)
    with pytest.raises(FileNotFoundError, match="no trained tokenizer"):
        run_evaluate(limited, run=str(tmp_path / "nowhere"), split="val", images=None, from_cache=False)


@pytest.mark.slow
def test_two_processes_through_the_cli_match_one(eval_setup):
    """`revq-pipe eval` as 2 gloo ranks gives the report of a single process."""
    settings = ["vae.device=cpu", f"data.resolution={RESOLUTION}", "encode.num_workers=0", "eval.batch_size=4",
                f"paths.root={eval_setup.run.parent / 'artifacts'}"]
    command = [sys.executable, "-m", "revq_pipe.stages.cli", "eval", "--run", str(eval_setup.run), "--split", "two",
               "--images", str(eval_setup.images), "--vae", str(eval_setup.vae)] + [arg for s in settings for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with Ranks(command, env) as ranks:  # the single-process reference is computed while the ranks start
        cfg = make_config(eval_setup.run.parent, eval_setup.vae, eval_setup.images, **{"eval.batch_size": 4})
        one = run_evaluate(cfg, run=str(eval_setup.run), split="one", images=str(eval_setup.images), from_cache=False)
        result = ranks.finish()
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((eval_setup.run / "eval_two.json").read_text())
    assert two["num_images"] == one["num_images"] == NUM_GOOD_IMAGES
    assert two["protocol"]["skipped"]["keys"] == one["protocol"]["skipped"]["keys"]
    for key in ("psnr", "psnr_y", "ssim", "latent_mse", "latent_mse_quantized", "codebook_usage", "perplexity"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["vae_ceiling"]["psnr"] == pytest.approx(one["vae_ceiling"]["psnr"], rel=1e-4)
