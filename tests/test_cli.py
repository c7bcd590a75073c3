"""The CLI surface: commands listed, bad settings refused with one clear line."""

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
