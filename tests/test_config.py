"""The precedence chain defaults < YAML < --set < flags, and its refusals."""

from pathlib import Path

import pytest
import yaml

from revq_pipe.stages.config import ConfigError, RevqConfig, config_from_dict, config_to_dict, load_config, save_config


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_expand_root_into_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.train.run == str(tmp_path / "artifacts/runs/demo")
    assert cfg.data.train_cache == str(tmp_path / "artifacts/cache/train.zarr")
    # token stores land beside the run they come from; {split} is the stage's to fill
    assert cfg.tokenize.out == str(tmp_path / "artifacts/runs/demo/tokens/{split}.zarr")
    assert load_config(None, ["train.run=elsewhere/r"]).tokenize.out == str(tmp_path / "elsewhere/r/tokens/{split}.zarr")
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


def test_yaml_that_does_not_parse_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML \(.* at line 2, column 1\)"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"--set train.epochs=\[1 is not valid YAML"):
        load_config(None, ["train.epochs=[1"])


def test_unknown_yaml_key_names_the_file(tmp_path):
    preset = write_yaml(tmp_path / "bad.yaml", {"train": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="bad.yaml.*unknown key 'train.lr'"):
        load_config(preset)


def test_missing_config_file_says_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="is no file .* and no shipped preset. Pass --config with a YAML file, or "
                                          "a preset by name: 256T-B, 256T-L, 512T, demo"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # outside the repository, configs/demo.yaml is not there: say the preset's name
    with pytest.raises(ConfigError, match=f"nothing at {tmp_path}/configs/demo.yaml.*the shipped preset of that name "
                                          "is --config demo"):
        load_config("configs/demo.yaml")


def test_a_preset_by_name_is_the_shipped_file_and_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = Path(__file__).resolve().parents[1] / "configs"
    assert config_to_dict(load_config("512T")) == config_to_dict(load_config(shipped / "512T.yaml"))
    assert load_config("256T-B.yaml").quantizer.codebook_size == 65536  # the file name works as well


def test_a_preset_extends_another_and_its_own_keys_win(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", {"train": {"epochs": 7, "batch_size": 64}, "quantizer": {"reset": False}})
    child = write_yaml(tmp_path / "sub" / "child.yaml", {"extends": "../base.yaml", "train": {"epochs": 9}})
    cfg = load_config(child)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.quantizer.reset) == (9, 64, False)
    on_shipped = write_yaml(tmp_path / "mine.yaml", {"extends": "512T", "train": {"epochs": 3}})
    cfg = load_config(on_shipped)  # a shipped preset by name, which itself extends the shared ImageNet base
    assert (cfg.train.epochs, cfg.quantizer.num_tokens, cfg.data.resolution) == (3, 512, 256)
    write_yaml(base, {"extends": "sub/child.yaml"})
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(child)
    write_yaml(base, {"extends": "nowhere.yaml"})
    with pytest.raises(ConfigError, match="'nowhere.yaml' is no file"):
        load_config(child)
    write_yaml(base, {"train": {"lr": 1}})  # an error in a base names the base
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'train\.lr'"):
        load_config(child)


@pytest.mark.parametrize("key", ["data.val_cache", "tokenize.out", "train.run", "data.train_images"])
def test_a_url_that_lost_a_slash_is_refused_not_made_a_local_folder(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="s3://"):
        load_config(None, [f"{key}=s3:/mybucket/val.zarr"])
    assert load_config(None, [f"{key}=./s3:/mybucket/val.zarr"])  # spelled as a local folder, it is one


@pytest.mark.parametrize("values", [{"depth": 0}, {"depth": -1}, {"width": 48, "head_dim": 32}, {"head_dim": 0},
                                    {"kind": "none", "width": 0}, {"forward": "fast"}, {"kind": "mlp"}])
def test_the_config_accepts_exactly_the_rectifiers_that_build(values):
    """One rule for a rectifier spec: the config refuses what cannot be built and accepts what can (depth 0 is the
    two 3x3 convs alone; the identity rectifier has no width)."""
    from revq_pipe.pipeline.rectifier import build_rectifier
    from revq_pipe.pipeline.rectifier_spec import RectifierSpec

    sets = [f"rectifier.{key}={value}" for key, value in values.items()]
    try:
        build_rectifier(RectifierSpec(**values), 32)
    except ValueError:
        with pytest.raises(ConfigError, match="rectifier"):
            load_config(None, sets)
    else:
        assert load_config(None, sets).rectifier == RectifierSpec(**values)


@pytest.mark.parametrize("name", ["none", "flip", "ten-crop", "rotate", "Flip"])
def test_the_config_accepts_exactly_the_augmentations_the_views_cut(name):
    from revq_pipe.pipeline.views import view_set

    try:
        view_set(name, 8)
    except ValueError:
        with pytest.raises(ConfigError, match=f"tokenize.augment='{name}' is not one of none, flip, ten-crop"):
            load_config(None, [f"tokenize.augment={name}"])
    else:
        assert load_config(None, [f"tokenize.augment={name}"]).tokenize.augment == name


def test_the_built_in_defaults_are_the_demo(tmp_path, monkeypatch):
    """The defaults are one coherent setting: the demo's data and VAE with a model that fits the demo's cache."""
    import json

    from revq_pipe.stages.config import DEMO_VAE

    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert config_to_dict(cfg) == config_to_dict(load_config("demo")), "the demo preset adds nothing to the defaults"
    vae = json.loads((Path(DEMO_VAE) / "config.json").read_text())
    side = cfg.data.resolution // 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    assert (vae["latent_channels"] * side * side) % cfg.quantizer.num_tokens == 0, "tokens tile the demo latent"
    demo_train_latents = 8 * 256  # write_demo_images: 8 photographs x 256 train crops
    assert cfg.quantizer.codebook_size <= demo_train_latents and cfg.train.batch_size <= demo_train_latents
    assert cfg.rectifier.width % vae["latent_channels"] == 0 and cfg.data.train_images.startswith(str(tmp_path))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["quantizer.num_tokens=256", "quantizer.codebook_size=1024"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again, RevqConfig)


def test_a_run_recorded_by_an_older_version_loads_without_its_retired_keys_and_says_so(capsys):
    recorded = config_to_dict(RevqConfig())
    recorded["train"].update(bf16=True, epochs=7)
    recorded["vae"]["autocast_bf16"] = True
    cfg = config_from_dict(recorded, origin="RUN/config.yaml")
    assert (cfg.train.epochs, cfg.train.precision, cfg.vae.precision) == (7, "fp32", "fp32")
    said = capsys.readouterr().err
    assert "RUN/config.yaml was written by an older revq-pipe: left out vae.autocast_bf16, train.bf16" in said
    assert "take their defaults" in said
    with pytest.raises(ConfigError, match=r"train.bf16 is no longer a setting; use train.precision"):
        load_config(None, ["train.bf16=true"], {})


@pytest.mark.parametrize("setting, message", [
    ("adapt.train=statistics", r"at least one of codebooks or rectifier"), ("adapt.epochs=-3", r"adapt.epochs=-3 and"),
    ("adapt.steps=0", r"adapt.steps=0 must be positive"), ("adapt.rectifier_lr=-1", r"adapt.rectifier_lr=-1.0 must"),
])
def test_an_adaptation_that_would_train_nothing_is_refused_before_it_starts(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting], {})
