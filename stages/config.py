"""One typed configuration for every command.

Precedence, lowest first: the dataclass defaults below (or, for a command given a training run,
the config that run recorded), a YAML preset (`--config`), `--set key.sub=value` overrides, then
explicit command-line flags. A flag the user did not pass arrives here as None and never overrides
anything. Unknown keys are an error.

Every location is resolved once, here: "{root}" is filled in and local paths become absolute, so
what a run or a cache records works from any directory. URLs (s3://, gs://, ...) stay as they are.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from revq_pipe.cache import storage
from revq_pipe.cache.storage import is_url
from revq_pipe.pipeline.files import atomic_write_text
from revq_pipe.pipeline.rectifier_spec import FORWARDS, KINDS, RectifierSpec


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says how to fix it."""


@dataclass
class PathsConfig:
    root: str = "artifacts"  # every generated cache and run lives below this folder


@dataclass
class StorageConfig:
    # An S3-compatible endpoint (MinIO, R2, a local test server); empty = the standard places
    # (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, ~/.aws). Credentials never come from here.
    endpoint_url: str = ""


@dataclass
class DataConfig:
    train_images: str = "{root}/demo/images/shards/train-*.tar"
    val_images: str = "{root}/demo/images/shards/val-*.tar"
    train_cache: str = "{root}/cache/train.zarr"
    val_cache: str = "{root}/cache/val.zarr"
    resolution: int = 64


# The embedded demo's VAE, shipped in the repository (stages/ sits one level below its root).
DEMO_VAE = str(Path(__file__).resolve().parents[1] / "demo" / "vae")

# Settings that name a local file or folder (or a URL); made absolute by load_config.
PATH_KEYS = ("paths.root", "data.train_images", "data.val_images", "data.train_cache", "data.val_cache",
             "train.run", "train.init_from", "train.push_to", "eval.fid_weights", "eval.lpips_weights", "tokenize.out")


@dataclass
class VaeConfig:
    source: str = DEMO_VAE  # a local folder or a hub id
    device: str = "auto"
    autocast_bf16: bool = True  # only takes effect on CUDA


@dataclass
class EncodeConfig:
    batch_size: int = 32
    num_workers: int = 2
    chunk_size: int = 256
    latent_dtype: str = "float16"


@dataclass
class QuantizerConfig:
    num_tokens: int = 512
    codebook_size: int = 16384
    init: str = "sample"
    reset: bool = True
    reset_fraction: float = 0.2
    reset_noise: float = 0.1
    search_memory_mb: int = 256


@dataclass
class TrainConfig:
    run: str = "{root}/runs/demo"
    epochs: int = 100
    batch_size: int = 256
    codebook_lr: float = 1e-2
    codebook_weight_decay: float = 0.0
    rectifier_lr: float = 5e-4
    rectifier_weight_decay: float = 1e-4
    final_lr_fraction: float = 0.05
    rectifier_warmup_steps: int = 100  # rectifier lr ramp, at most one epoch, residual form only (train_loop)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    data_on_device: str = "auto"
    allow_small_cache: bool = False
    init_from: str = ""  # a tokenizer folder to start codebooks, rectifier (and statistics) from
    init_statistics: bool = True  # with init_from: keep the tokenizer's normalizer statistics
    push_to: str = ""  # a URL (or folder) the finished tokenizer/ is copied to; the run itself stays local
    log_every: int = 50


@dataclass
class EvalConfig:
    batch_size: int = 32
    limit: int = 0  # 0 evaluates the whole split
    fid_weights: str = ""
    lpips_weights: str = ""
    grid_images: int = 8


@dataclass
class TokenizeConfig:
    out: str = "{root}/tokens/{split}.zarr"
    batch_size: int = 64


@dataclass
class ToleranceConfig:
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    limit: int = 256


@dataclass
class RevqConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    rectifier: RectifierSpec = field(default_factory=RectifierSpec)  # the rectifier library's own spec
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for every URL location (an explicit endpoint; credentials from the standard places)."""
        return storage.storage_options(self.storage.endpoint_url)


CHOICES = {
    "quantizer.init": ("sample", "kmeans++"),
    "rectifier.kind": KINDS,
    "rectifier.forward": FORWARDS,
    "train.data_on_device": ("auto", "always", "never"),
    "encode.latent_dtype": ("float16", "float32"),
}


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    base: RevqConfig | None = None,
) -> RevqConfig:
    """Resolve defaults (or `base`, e.g. a run's recorded config) < YAML < --set < flags into one config."""
    cfg = copy.deepcopy(base) if base is not None else RevqConfig()
    if config_file is not None:
        _apply_mapping(cfg, _read_yaml(Path(config_file)), origin=str(config_file))
    for item in overrides or []:
        key, value = _split_override(item)
        _assign(cfg, key, yaml.safe_load(value), origin=f"--set {item}")
    for key, value in (flags or {}).items():
        if value is not None:
            _assign(cfg, key, value, origin=f"flag for {key}")
    _resolve_locations(cfg)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: RevqConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RevqConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) next to a command's outputs."""
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def save_config_beside(cfg: RevqConfig, store: str | Path, options: dict | None = None) -> str | Path:
    """Write the resolved config as <store stem>.config.yaml beside a store (local path or URL); returns where."""
    if not storage.is_url(store):
        return save_config(cfg, Path(store).with_suffix(".config.yaml"))
    head, _, name = str(store).rstrip("/").rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    target = f"{head}/{stem}.config.yaml"
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    storage.write_bytes_atomic(target, text.encode(), options)
    return target


def config_from_dict(data: dict[str, Any], origin: str = "dict") -> RevqConfig:
    """Rebuild a config from a resolved dict (for example a run's config.yaml)."""
    cfg = RevqConfig()
    _apply_mapping(cfg, data, origin=origin)
    _validate(cfg)
    return cfg


# --- internals ------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML preset such as configs/demo.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not of the form section.key=value (for example --set train.epochs=10)")
    return key.strip(), value


def _apply_mapping(cfg: RevqConfig, data: dict[str, Any], origin: str) -> None:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            _assign(cfg, f"{section}.{key}", value, origin=origin)


def _assign(cfg: RevqConfig, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{origin}: key {dotted!r} must be section.key, e.g. train.epochs")
    section_name, key = parts
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section_name not in sections:
        raise ConfigError(f"{origin}: unknown section {section_name!r}; known sections: {', '.join(sections)}")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(
            f"{origin}: unknown key {dotted!r}; keys of {section_name}: {', '.join(fields)}"
        )
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, dotted, origin))


def _coerce(value: Any, hint: Any, dotted: str, origin: str) -> Any:
    origin_type = typing.get_origin(hint)
    if origin_type in (list, typing.List):
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: {dotted} must be a list, got {value!r}")
        return [_coerce(v, item_type, dotted, origin) for v in value]
    if origin_type in (typing.Union, types.UnionType):
        raise ConfigError(f"{dotted}: union types are not supported in the config")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{origin}: {dotted} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{origin}: {dotted} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{origin}: {dotted} must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{origin}: {dotted} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{origin}: {dotted} must be a number, got {value!r}") from None
    if hint is str:
        if value is None:
            return ""
        return str(value)
    raise ConfigError(f"{dotted}: unsupported config type {hint!r}")


def _resolve_locations(cfg: RevqConfig) -> None:
    """Fill "{root}" in every string setting ("{split}" is left for the stage) and make local paths
    absolute; a VAE source becomes absolute only when it is an existing local folder (else it may be
    a hub id, which FrozenVAE.load tells apart)."""
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, str) and "{root}" in value:
                setattr(section, f.name, value.replace("{root}", cfg.paths.root))
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        setattr(getattr(cfg, section), key, absolute_location(value))
    if cfg.vae.source and Path(cfg.vae.source).expanduser().exists():
        cfg.vae.source = absolute_location(cfg.vae.source)


def absolute_location(value: str) -> str:
    """A URL or "" as it is; a local path (or glob / brace pattern) made absolute against the current folder."""
    if not value or is_url(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def _validate(cfg: RevqConfig) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    positive = [
        "data.resolution", "encode.batch_size", "encode.chunk_size", "quantizer.num_tokens",
        "quantizer.codebook_size", "rectifier.width", "rectifier.depth", "rectifier.head_dim",
        "train.epochs", "train.batch_size", "eval.batch_size", "tokenize.batch_size",
    ]
    for dotted in positive:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{dotted}={value} must be positive")
    if not 0.0 < cfg.train.final_lr_fraction <= 1.0:
        raise ConfigError(f"train.final_lr_fraction={cfg.train.final_lr_fraction} must be in (0, 1]")
    if not 0.0 <= cfg.quantizer.reset_fraction <= 1.0:
        raise ConfigError(f"quantizer.reset_fraction={cfg.quantizer.reset_fraction} must be in [0, 1]")
