"""`revq-pipe adapt`: a tokenizer trained on one domain, adapted to another, judged on the new one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.stages.cli import app
from revq_pipe.stages.config import load_config
from revq_pipe.stages.train import run_train
from tests.helpers_train import SHAPE, make_cache

SIZES = ["quantizer.num_tokens=32", "quantizer.codebook_size=16", "rectifier.width=32", "rectifier.depth=1",
         "rectifier.head_dim=16", "train.batch_size=32", "train.device=cpu"]


def domain_latents(n: int, seed: int, domain: int) -> np.ndarray:
    """Latents near a 6-dimensional subspace whose basis, offsets and scales depend on the domain."""
    size = int(np.prod(SHAPE))
    fixed = np.random.default_rng(1000 + domain)
    basis, offset, scale = fixed.normal(size=(6, size)), fixed.normal(0, 2, size), fixed.uniform(0.5, 2, size)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) @ basis + 0.3 * rng.normal(size=(n, size))
    return (x * scale + offset).reshape(n, *SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Caches of two domains and a tokenizer trained on the first."""
    root = tmp_path_factory.mktemp("domains")
    caches = {}
    for domain in (0, 1):
        (root / str(domain)).mkdir()
        caches[domain] = tuple(make_cache(root / str(domain), split, domain_latents(n, seed, domain))
                               for split, n, seed in (("train", 256 if domain == 0 else 160, 0), ("val", 64, 1)))
    source = run_train(load_config(None, [*SIZES, "train.epochs=3", f"data.train_cache={caches[0][0]}",
                                          f"data.val_cache={caches[0][1]}", f"train.run={root / 'source'}"], {}))
    return root, caches, source / "tokenizer"


def adapt(runner_args: list[str]) -> None:
    result = CliRunner().invoke(app, ["adapt", *runner_args])
    assert result.exit_code == 0, result.output


def test_the_default_recipe_adapts_the_rectifier_and_beats_the_source_tokenizer_on_the_new_domain(domains, tmp_path):
    root, caches, source = domains
    run = tmp_path / "adapted"
    adapt(["--from", str(source), "--train-cache", str(caches[1][0]), "--val-cache", str(caches[1][1]),
           "--run", str(run), "--set", "adapt.steps=24", "--set", "train.batch_size=32"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 160 latents, 16 held out for the gate, batch 32: 5 steps per epoch, so 24 steps take 5 epochs
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25]
    start = metrics[0]["init_val_rect_mse"]  # the source tokenizer on the new domain, beside every epoch
    assert all(m["init_val_rect_mse"] == start for m in metrics)
    assert metrics[-1]["val_rect_mse"] < 0.98 * start, (metrics[-1]["val_rect_mse"], start)
    assert all(m["val_rect_mse"] <= m["val_quant_mse"] for m in metrics)
    before, after = (RevqTokenizer.from_pretrained(path, device="cpu") for path in (source, run / "tokenizer"))
    assert torch.equal(before.quantizer.codebooks, after.quantizer.codebooks), "the codebooks were to stay"
    assert torch.equal(before.normalizer.mean, after.normalizer.mean), "and the statistics"
    assert metrics[0]["lr"] is None and all(m["codes_reset"] == 0 for m in metrics)
    config = load_config(run / "config.yaml")
    assert config.train.trainable == ["rectifier"] and config.train.init_from == str(source)
    assert (config.quantizer.num_tokens, config.rectifier.width) == (32, 32)  # the tokenizer's own geometry


def test_codebooks_and_statistics_adapt_when_asked_and_the_reset_works_from_a_tokenizer(domains, tmp_path):
    root, caches, source = domains
    run = tmp_path / "all"
    adapt(["--from", str(source), "--train-cache", str(caches[1][0]), "--val-cache", str(caches[1][1]),
           "--run", str(run), "--train", "codebooks,rectifier,statistics", "--epochs", "2", "--set",
           "train.batch_size=32"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, after = (RevqTokenizer.from_pretrained(path, device="cpu") for path in (source, run / "tokenizer"))
    assert not torch.equal(before.quantizer.codebooks, after.quantizer.codebooks)
    assert not torch.equal(before.normalizer.mean, after.normalizer.mean)  # the new domain's statistics
    assert metrics[0]["codes_reset"] > 0  # codes the new domain never picks are moved where it needs them
    assert 0 < metrics[-1]["val_codebook_usage"] <= 1


def test_another_latent_shape_another_vae_or_a_missing_tokenizer_is_refused_in_one_line(domains, tmp_path):
    root, caches, source = domains
    (tmp_path / "half").mkdir()
    other = make_cache(tmp_path / "half", "train", domain_latents(64, 0, 1)[:, :, :2].copy())
    result = CliRunner().invoke(app, ["adapt", "--from", str(source), "--train-cache", str(other),
                                      "--val-cache", str(other), "--run", str(tmp_path / "r")])
    assert result.exit_code == 2 and "shape (8, 2, 4) but the tokenizer" in result.output
    named = tmp_path / "named"  # the source tokenizer, as if its caches had named their VAE
    shutil.copytree(source, named)
    settings = json.loads((named / "config.json").read_text())
    settings["vae"] = {"source": "domain/vae", "class": "AutoencoderDC", "weights_sha256": "1" * 64}
    (named / "config.json").write_text(json.dumps(settings))
    (tmp_path / "vae").mkdir()
    other_vae = {"source": "other/vae", "class": "AutoencoderDC", "weights_sha256": "0" * 64}
    elsewhere = [make_cache(tmp_path / "vae", split, domain_latents(160, seed, 1), vae_identity=other_vae)
                 for split, seed in (("train", 0), ("val", 1))]
    result = CliRunner().invoke(app, ["adapt", "--from", str(named), "--train-cache", str(elsewhere[0]),
                                      "--val-cache", str(elsewhere[1]), "--run", str(tmp_path / "r")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "VAE mismatch" in errors[0] and "other/vae" in errors[0] and "domain/vae" in errors[0]
    result = CliRunner().invoke(app, ["adapt", "--from", str(tmp_path / "nothing"), "--train-cache",
                                      str(caches[1][0]), "--val-cache", str(caches[1][1]), "--run",
                                      str(tmp_path / "r")])
    assert result.exit_code == 2 and "tokenizer folder" in result.output and "does not exist" in result.output
    assert not (tmp_path / "r").exists()


def test_without_the_gate_an_adapted_rectifier_uses_its_whole_correction(domains, tmp_path):
    root, caches, source = domains
    fitted = float(RevqTokenizer.from_pretrained(source, device="cpu").rectifier.residual_gate)
    assert fitted != 1.0, "the source's gate was fitted, so the test can see it reset"
    run = tmp_path / "ungated"
    adapt(["--from", str(source), "--train-cache", str(caches[1][0]), "--val-cache", str(caches[1][1]),
           "--run", str(run), "--epochs", "1", "--set", "train.gate=false", "--set", "train.batch_size=32"])
    assert float(RevqTokenizer.from_pretrained(run / "tokenizer", device="cpu").rectifier.residual_gate) == 1.0
