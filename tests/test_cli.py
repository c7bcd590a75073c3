"""The CLI surface: commands listed, bad settings refused with one clear line."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from revq_pipe.stages.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("encode", "train", "eval", "tokenize", "tolerance", "cache", "demo"):
        assert command in result.output
    cache_help = runner.invoke(app, ["cache", "--help"])
    assert "import" in cache_help.output and "info" in cache_help.output


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "revq_pipe.stages.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "tolerance" in result.stdout


def test_unknown_setting_is_one_clear_error():
    result = runner.invoke(app, ["train", "--set", "train.epoch=3"])
    assert result.exit_code == 2
    assert "unknown key 'train.epoch'" in result.output
    assert "Traceback" not in result.output


def test_encode_unknown_split_needs_paths():
    result = runner.invoke(app, ["encode", "--split", "test"])
    assert result.exit_code != 0
    assert "--images and --out" in result.output


def test_missing_inputs_name_the_path(tmp_path):
    missing = tmp_path / "no-such-images"
    result = runner.invoke(app, ["encode", "--images", str(missing), "--out", str(tmp_path / "c.zarr")])
    assert result.exit_code == 2 and str(missing) in result.output.replace("\n", "")
    result = runner.invoke(app, ["train", "--train-cache", str(tmp_path / "t.zarr"),
                                 "--val-cache", str(tmp_path / "v.zarr"), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and "t.zarr" in result.output.replace("\n", "")
    assert not (tmp_path / "c.zarr").exists()


def test_help_shows_metavars_and_config_prints_every_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    help_text = runner.invoke(app, ["cache", "info", "--help"]).output
    assert "STORE" in help_text and "{store}" not in help_text and "<bool>" not in help_text
    result = runner.invoke(app, ["config", "--set", "train.epochs=7", "--set", "train.run=runs/x"])
    assert result.exit_code == 0
    assert "epochs: 7" in result.output and f"run: {tmp_path / 'runs/x'}" in result.output
    assert "import-reference" in runner.invoke(app, ["--help"]).output


def test_the_cli_is_not_shadowed_by_a_users_own_modules(tmp_path):
    """A user's cache.py and pipeline/ in the working directory must not replace the tool's packages."""
    (tmp_path / "cache.py").write_text("raise SystemExit('the user cache.py was imported')\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("raise SystemExit('the user pipeline/ was imported')\n")
    (tmp_path / "stages.py").write_text("raise SystemExit('the user stages.py was imported')\n")
    script = "from revq_pipe.stages.cli import main; import sys; sys.argv = ['revq-pipe', 'config']; main()"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "user" not in result.stderr and "quantizer:" in result.stdout


def test_a_run_given_to_eval_supplies_its_own_data(tmp_path, monkeypatch):
    """eval --run DIR takes the images the run recorded, not the built-in demo data."""
    from helpers_eval import make_eval_setup

    from revq_pipe.stages.config import save_config

    setup = make_eval_setup(tmp_path / "setup")
    save_config(setup.cfg, setup.run / "config.yaml")  # what `revq-pipe train` records
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("REVQ_FID_WEIGHTS", raising=False)
    monkeypatch.delenv("REVQ_LPIPS_WEIGHTS", raising=False)
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


def test_help_does_not_import_torch():
    """`revq-pipe --help` stays fast (~0.3 s): the CLI and config load no torch, diffusers or stage."""
    script = "import sys, revq_pipe.stages.cli; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
