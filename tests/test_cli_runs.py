"""Commands given a run: they start from what it recorded, refuse what they cannot honour, record what they did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from revq_pipe.cache.importer import import_tensor
from revq_pipe.stages.cli import app
from revq_pipe.stages.config import save_config
from tests.helpers_eval import RESOLUTION, make_eval_setup

runner = CliRunner()


def text_of(result) -> str:
    return " ".join(result.output.split())  # the console wraps long lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer run as `revq-pipe train` leaves it: RUN/tokenizer and RUN/config.yaml."""
    setup = make_eval_setup(tmp_path_factory.mktemp("runs"))
    save_config(setup.cfg, setup.run / "config.yaml")
    return setup


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The commands run from an unrelated folder, with no metric weights in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REVQ_FID_WEIGHTS", raising=False)
    monkeypatch.delenv("REVQ_LPIPS_WEIGHTS", raising=False)
    return tmp_path


def test_a_run_given_to_eval_supplies_its_own_data(setup, elsewhere):
    """eval --run DIR takes the images the run recorded, not the built-in demo data."""
    result = runner.invoke(app, ["eval", "--run", str(setup.run), "--limit", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((setup.run / "eval_val_first3.json").read_text())
    assert report["protocol"]["source"] == setup.cfg.data.val_images and report["num_images"] == 3
    assert not (elsewhere / "artifacts").exists()
    # a report of another scope never replaces this one
    result = runner.invoke(app, ["eval", "--run", str(setup.run), "--from-cache"])
    assert result.exit_code == 0, result.output
    assert (setup.run / "eval_val_latents.json").is_file()
    assert json.loads((setup.run / "eval_val_first3.json").read_text()) == report


def test_eval_refuses_a_resolution_it_cannot_honour_and_records_what_it_did(setup, elsewhere):
    report, recorded = setup.run / "eval_val_first2.json", setup.run / "eval_val_first2.config.yaml"
    result = runner.invoke(app, ["eval", "--run", str(setup.run), "--limit", "2", "--set", "data.resolution=48"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"data.resolution=48 cannot be honoured: this tokenizer's image recipe is {RESOLUTION} px" in text_of(result)
    assert not report.exists() and not recorded.exists(), "nothing is recorded for work that was not done"

    result = runner.invoke(app, ["eval", "--run", str(setup.run), "--limit", "2", "--images", str(setup.images)])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(recorded.read_text())
    assert config["data"]["resolution"] == RESOLUTION
    assert config["data"]["val_images"] == str(setup.images)
    assert config["vae"]["source"] == str(setup.vae.resolve()), "the VAE the tokenizer records, as used"
    assert json.loads(report.read_text())["vae"]["source"] == config["vae"]["source"]


def test_tokenize_without_out_writes_beside_the_run(setup, elsewhere):
    result = runner.invoke(app, ["tokenize", "--run", str(setup.run), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert (setup.run / "tokens" / "val.zarr" / "zarr.json").is_file()
    assert not (elsewhere / "artifacts").exists()


def test_eval_on_a_run_stopped_in_its_first_epoch_says_how_to_resume(tmp_path, elsewhere):
    run = tmp_path / "stopped"
    run.mkdir()
    cfg = yaml.safe_load(yaml.safe_dump({"train": {"run": str(run), "epochs": 4}}))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))  # what train writes before its first epoch
    result = runner.invoke(app, ["eval", "--run", str(run)])
    text = text_of(result)
    assert result.exit_code == 2 and "unfinished: 0 of 4 epochs are done" in text, text
    assert f"revq-pipe train --run {run}" in text and "pass a finished run" not in text


# --- train given an existing run ---------------------------------------------------------------

TINY = ["--set", "quantizer.num_tokens=16", "--set", "quantizer.codebook_size=8", "--set", "rectifier.width=16",
        "--set", "rectifier.head_dim=8", "--set", "train.batch_size=32", "--set", "train.device=cpu",
        "--set", "train.seed=3"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("caches")
    rng = np.random.default_rng(0)
    out = []
    for split, n in (("train", 96), ("val", 32)):
        np.save(folder / f"{split}.npy", rng.normal(size=(n, 4, 4, 4)).astype(np.float32))
        import_tensor(folder / f"{split}.npy", folder / f"{split}.zarr", split=split, chunk_size=32)
        out.append(folder / f"{split}.zarr")
    return out[0], out[1]


def epochs_in(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_resumes_and_extends_a_run_from_what_it_recorded(caches, tmp_path, elsewhere):
    """Only what is passed now is compared with the run; extension only when asked, in real numbers."""
    run = tmp_path / "run"
    first = ["train", "--train-cache", str(caches[0]), "--val-cache", str(caches[1]), "--run", str(run), *TINY]
    assert runner.invoke(app, [*first, "--epochs", "1"]).exit_code == 0
    # the second call repeats none of the first call's settings
    result = runner.invoke(app, ["train", "--run", str(run), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert epochs_in(run) == [1, 2]
    assert "extending the run: 1 epochs done, 2 asked; its learning-rate schedule was laid out for 1 epochs" \
        in text_of(result)
    # a preset's train.epochs does not extend the run; the log says so, and which numbers are real
    preset = elsewhere / "preset.yaml"
    preset.write_text(yaml.safe_dump({"train": {"epochs": 10}}))
    result = runner.invoke(app, ["train", "--run", str(run), "--config", str(preset)])
    assert result.exit_code == 0, result.output
    text = text_of(result)
    assert "keeping the run's train.epochs=2: a preset's train.epochs=10 does not extend a run" in text
    assert "has already finished its 2 epochs" in text and epochs_in(run) == [1, 2]
    # what is passed now and changes the training is still refused
    result = runner.invoke(app, ["train", "--run", str(run), "--epochs", "3", "--set", "train.seed=4"])
    assert result.exit_code == 2 and "train.seed: 3 -> 4" in text_of(result)
    assert epochs_in(run) == [1, 2]
