"""The precedence chain defaults < YAML < --set < flags, and its refusals."""

from pathlib import Path

import pytest
import yaml

from revq_pipe.stages.config import ConfigError, RevqConfig, config_from_dict, config_to_dict, load_config, save_config


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_expand_root_into_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.train.run == str(tmp_path / "artifacts/runs/demo")
    assert cfg.data.train_cache == str(tmp_path / "artifacts/cache/train.zarr")
    assert cfg.tokenize.out == str(tmp_path / "artifacts/tokens/{split}.zarr")  # {split} is the stage's to fill
    assert Path(cfg.vae.source).is_absolute() and (Path(cfg.vae.source) / "config.json").is_file()


def test_urls_stay_urls_and_relative_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train_cache=s3://bucket/train.zarr", "train.run=runs/a",
                             "vae.source=org/some-hub-model"])
    assert cfg.data.train_cache == "s3://bucket/train.zarr"
    assert cfg.train.run == str(tmp_path / "runs/a")
    assert cfg.vae.source == "org/some-hub-model"  # no such local folder: left for the hub


def test_precedence_yaml_then_set_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = write_yaml(tmp_path / "p.yaml", {"train": {"epochs": 7, "batch_size": 64}, "paths": {"root": "out"}})
    cfg = load_config(preset)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.run) == (7, 64, str(tmp_path / "out/runs/demo"))
    cfg = load_config(preset, ["train.epochs=9"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 64)
    cfg = load_config(preset, ["train.epochs=9"], {"train.epochs": 11, "train.batch_size": None})
    assert (cfg.train.epochs, cfg.train.batch_size) == (11, 64), "a flag left out must not override the YAML"


def test_set_values_are_typed():
    cfg = load_config(None, ["rectifier.residual=false", "train.codebook_lr=0.5", "tolerance.sigmas=[0.1, 1]"])
    assert cfg.rectifier.residual is False
    assert cfg.train.codebook_lr == 0.5
    assert cfg.tolerance.sigmas == [0.1, 1.0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key 'train.epoch'"),
        ("trian.epochs=3", "unknown section 'trian'"),
        ("train.epochs=three", "must be an integer"),
        ("train.epochs", "section.key=value"),
        ("rectifier.kind=mlp", "rectifier.kind='mlp' is not one of"),
        ("train.epochs=0", "must be positive"),
    ],
)
def test_bad_overrides_are_refused_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unknown_yaml_key_names_the_file(tmp_path):
    preset = write_yaml(tmp_path / "bad.yaml", {"train": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="bad.yaml.*unknown key 'train.lr'"):
        load_config(preset)


def test_missing_config_file_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["quantizer.num_tokens=256", "quantizer.codebook_size=1024"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again, RevqConfig)
