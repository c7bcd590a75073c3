"""The CLI surface: commands listed, bad settings and inputs refused with one clear line, before heavy imports."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from revq_pipe.stages.cli import app

runner = CliRunner()


def test_help_lists_every_command_with_its_whole_description():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("encode", "train", "eval", "tokenize", "tolerance", "cache", "demo"):
        assert command in result.output
    assert "Stage one: run the frozen VAE encoder over a dataset into a latent cache." in " ".join(result.output.split())
    cache_help = runner.invoke(app, ["cache", "--help"])
    assert "import" in cache_help.output and "info" in cache_help.output
    for group in ([], ["cache"], ["demo"]):
        listing = runner.invoke(app, [*group, "--help"]).output.split("Commands:")[1]
        assert "..." not in listing, listing  # click cuts a long description at the terminal width


@pytest.mark.parametrize("command, argument", [(["import-reference"], "SRC"), (["cache", "info"], "STORE"),
                                               (["cache", "import"], "FILE")])
def test_arguments_are_shown_as_their_metavar(command, argument):
    text = runner.invoke(app, [*command, "--help"]).output
    assert f"[OPTIONS] {argument}\n" in text and f"\n  {argument}  " in text
    assert "{" + argument + "}" not in text and "<str>" not in text


def test_the_console_script_runs():
    """The entry point pyproject.toml declares, installed beside this Python by `make setup`."""
    script = Path(sys.executable).with_name("revq-pipe")
    result = subprocess.run([str(script), "config", "--config", "512T"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "codebook_size: 16384" in result.stdout and "torch" not in result.stderr


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


@pytest.mark.parametrize("args", [
    ["encode", "--images", "{missing}/images", "--out", "{missing}/c.zarr"],
    ["encode", "--images", "{missing}/shard-{{000..003}}.tar", "--out", "{missing}/c.zarr"],
    ["encode", "--images", "{here}", "--vae", "{missing}/vae", "--out", "{missing}/c.zarr"],
    ["train", "--train-cache", "{missing}/t.zarr", "--run", "{missing}/run"],
    ["eval", "--run", "{missing}/run"],
    ["tokenize", "--run", "{missing}/run", "--split", "val"],
    ["tolerance", "--run", "{here}", "--images", "{missing}/val"],
    ["cache", "info", "{missing}/c.zarr"],
])
def test_a_missing_input_is_refused_before_torch_is_imported(args, tmp_path):
    """Refusing a path that is not there takes a fraction of a second: no stage, torch or model is loaded."""
    args = [a.format(missing=tmp_path / "nowhere", here=tmp_path) for a in args]
    script = ("import sys; from revq_pipe.stages.cli import app\n"
              "try:\n    app(sys.argv[1:])\nexcept SystemExit as end:\n    code = end.code\n"
              "print('exit', code, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1] == "exit 2 False False", result.stdout + result.stderr
    assert "does not exist" in result.stderr and str(tmp_path / "nowhere") in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


def test_a_url_that_lost_a_slash_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    result = runner.invoke(app, ["encode", "--images", str(images), "--out", "s3:/mybucket/val.zarr"])
    assert result.exit_code == 2 and "s3://" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"], "no local folder named s3:"


def test_config_presets_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["config", "--config", "configs/demo.yaml"])
    assert result.exit_code == 2 and "--config demo" in result.output and "512T" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["config", "--config", "256T-L"])
    assert result.exit_code == 0 and "codebook_size: 262144" in result.output


def test_debug_shows_the_traceback_instead_of_one_line(monkeypatch):
    from revq_pipe.stages.config import ConfigError

    quiet = runner.invoke(app, ["config", "--set", "train.epoch=3"])
    assert quiet.exit_code == 2 and quiet.exception is not None and not isinstance(quiet.exception, ConfigError)
    loud = runner.invoke(app, ["--debug", "config", "--set", "train.epoch=3"])
    assert isinstance(loud.exception, ConfigError)
    monkeypatch.setenv("REVQ_DEBUG", "1")
    assert isinstance(runner.invoke(app, ["config", "--set", "train.epoch=3"]).exception, ConfigError)


def test_an_unreachable_hub_id_is_one_error_without_warnings(tmp_path, monkeypatch):
    """Offline, a hub id fails with our one line, and huggingface_hub's deprecation noise is not printed first."""
    from revq_pipe.pipeline.vae import FrozenVAE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(FileNotFoundError, match="cannot be loaded from the Hugging Face hub"):
            FrozenVAE.load("some-org/some-vae", device="cpu")
    assert [str(w.message) for w in caught if "huggingface_hub" in w.filename] == []


def test_encode_over_a_complete_store_of_other_inputs_says_what_differs(tmp_path):
    from tests.helpers_eval import write_images
    from tests.helpers_vae import make_tiny_vae

    vae = make_tiny_vae(tmp_path, latent_channels=4, image_size=32)
    first, second = write_images(tmp_path / "first", n=6), write_images(tmp_path / "second", n=4, seed=1)
    common = ["--vae", str(vae), "--resolution", "32", "--out", str(tmp_path / "val.zarr"), "--split", "val",
              "--set", "vae.device=cpu", "--set", "encode.num_workers=0"]
    assert runner.invoke(app, ["encode", "--images", str(first), *common]).exit_code == 0
    result = runner.invoke(app, ["encode", "--images", str(second), *common[:2], "--resolution", "16", *common[4:]])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "num_inputs: 7 -> 5" in text and "image.resolution: 32 -> 16" in text, text
    assert f"made from {first}" in text and "--overwrite" in text


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


def test_help_does_not_import_torch():
    """`revq-pipe --help` stays fast (~0.3 s): the CLI and config load no torch, diffusers or stage."""
    script = "import sys, revq_pipe.stages.cli; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
