"""One typed configuration for every command.

Precedence, lowest first: the dataclass defaults below (the embedded demo; or, for a command given a
training run, what that run recorded: stages/run_dir.py `run_base_config`), a YAML preset (`--config`, a
file or a shipped preset by name; a preset may `extends:` another), `--set key.sub=value` overrides, then
explicit command-line flags. A flag the user did not pass arrives here as None and never overrides
anything. Unknown keys are an error. Each setting lives in the section of the command that uses it.

Every location is resolved once, here: "{root}" (paths.root) and then "{run}" (train.run) are filled in
and local paths become absolute, so what a run or a cache records works from any directory. URLs (s3://,
gs://, ...) stay as they are; a URL that lost a slash ("s3:/b/k") is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from revq_pipe.cache import storage
from revq_pipe.cache.schema import LATENT_DTYPES
from revq_pipe.cache.storage import is_url
from revq_pipe.pipeline.files import atomic_write_text
from revq_pipe.pipeline.choices import ADAPTABLE, AUGMENTS, INIT_METHODS, PRECISIONS, RESIDENCY, TRAINABLE
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.stages.console import log


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


# The embedded demo's VAE and the presets are package data (demo/vae/, configs/*.yaml): found where the
# package is installed, from a wheel or a checkout, never relative to the current folder.
DEMO_VAE = str(importlib.resources.files("revq_pipe.demo").joinpath("vae"))
PRESETS = importlib.resources.files("revq_pipe.configs")

# Settings that name a local file or folder (or a URL); made absolute by load_config.
PATH_KEYS = ("paths.root", "data.train_images", "data.val_images", "data.train_cache", "data.val_cache",
             "train.run", "train.init_from", "train.push_to", "eval.fid_weights", "eval.lpips_weights", "tokenize.out",
             "prior.run", "prior.train_tokens", "prior.val_tokens")


@dataclass
class VaeConfig:
    source: str = DEMO_VAE  # a local folder or a hub id
    device: str = "auto"
    precision: str = "fp32"  # fp32 | tf32 | bf16: the encoder's and decoder's math (pipeline/precision.py)


@dataclass
class EncodeConfig:
    batch_size: int = 32
    num_workers: int = 2
    chunk_size: int = 256
    latent_dtype: str = "float16"


# The built-in defaults are one coherent setting, the embedded demo (docs/measurements.md, "The embedded demo"): its
# images and caches under paths.root, its VAE, and a model sized for ~2,048 training latents of 32x8x8 on 2 CPU
# cores: 256 tokens of d=8 (one row of one channel), 256 codes per position (at most the number of training latents,
# which the codebook init draws from), a one-block rectifier 128 wide (RectifierSpec), 10 epochs. The ImageNet
# presets (configs/512T.yaml, ...) set the paper's sizes and recipe on top.
@dataclass
class QuantizerConfig:
    num_tokens: int = 256
    codebook_size: int = 256
    init: str = "sample"
    reset: bool = True
    reset_fraction: float = 0.2
    reset_noise: float = 0.1
    search_memory_mb: float = 0  # the search's working set on this machine; 0 = derived from the device


@dataclass
class TrainConfig:
    run: str = "{root}/runs/demo"
    epochs: int = 10
    batch_size: int = 128
    codebook_lr: float = 1e-2
    codebook_weight_decay: float = 0.0
    rectifier_lr: float = 5e-4
    rectifier_weight_decay: float = 1e-4
    final_lr_fraction: float = 0.05
    trainable: list[str] = field(default_factory=lambda: list(TRAINABLE))  # what the optimizer changes
    gate: bool = True  # fit the rectifier's gate on held-out training latents: never worse than quantized
    gate_holdout: int = 0  # latents held out for the gate; 0 = 2% of the split (32..10,000, at most a tenth)
    rectifier_warmup_steps: int = 100  # rectifier lr ramp, at most one epoch, residual form only (train_loop)
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | tf32 | bf16 (pipeline/precision.py); the codebook search is always fp32
    deterministic: bool = False  # deterministic CUDA kernels (slower); results are exact-resumable either way
    compile: bool = False
    data_on_device: str = "auto"  # where the split is read from; never changes which batches training sees
    shuffle_window: int = 65536  # samples per window of the epoch order (cache/loader.py); 0 = whole split
    allow_small_cache: bool = False
    init_from: str = ""  # a tokenizer folder to start codebooks, rectifier (and statistics) from
    init_statistics: bool = True  # with init_from: keep the tokenizer's normalizer statistics
    push_to: str = ""  # a URL (or folder) the finished tokenizer/ is copied to; the run itself stays local
    log_every: int = 8


@dataclass
class AdaptConfig:
    # `revq-pipe adapt` (stages/adapt.py); why this recipe: docs/adapt.md. With a few hundred images the
    # K codes of a position see too few latents to move without overfitting; the rectifier adapts well.
    train: list[str] = field(default_factory=lambda: ["rectifier"])  # of codebooks, rectifier, statistics
    steps: int = 200  # optimizer steps of the default schedule, whatever the size of the new data
    min_epochs: int = 2
    epochs: int = 0  # 0: from adapt.steps
    codebook_lr: float = 1e-2  # when the codebooks adapt too: the source recipe's
    rectifier_lr: float = 1e-3


@dataclass
class EvalConfig:
    batch_size: int = 32
    limit: int = 0  # 0 evaluates the whole split
    fid_weights: str = ""
    lpips_weights: str = ""
    grid_images: int = 8
    num_workers: int = 2  # image decoding processes


@dataclass
class TokenizeConfig:
    out: str = "{run}/tokens/{split}.zarr"  # beside the run ({run} is train.run); {split} is the stage's to fill
    batch_size: int = 64
    num_workers: int = 2  # image decoding processes
    chunk_size: int = 256  # inputs per work unit and rows per Zarr chunk of the token store
    augment: str = "none"  # views stored per image, one of AUGMENTS (pipeline/views.py)


# --- the token prior (stages/prior.py, docs/generation.md) --------------------------------------
@dataclass
class PriorConfig:
    run: str = "{root}/runs/prior-demo"
    train_tokens: str = "{run}/tokens/train-flip.zarr"  # where `revq-pipe tokenize` writes, beside the tokenizer's run
    val_tokens: str = "{run}/tokens/val.zarr"
    width: int = 256
    depth: int = 4
    heads: int = 4
    code_width: int = 128  # width of the maps from codebook vectors to input embeddings and output scores
    epochs: int = 10
    batch_size: int = 64  # the global batch, split evenly across ranks
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # cosine decay from lr to this fraction of it by the last step
    grad_clip: float = 1.0
    class_dropout: float = 0.1  # rate at which the class is replaced by the null class (guidance)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | tf32 | bf16 (the transformer under bfloat16 autocast); pipeline/precision.py
    log_every: int = 50
    cfg_scale: float = 2.0  # classifier-free guidance of samples (1.0 = none)
    temperature: float = 1.0
    top_k: int = 0  # 0 samples among all K codes
    eval_samples_per_class: int = 32
    cas_epochs: int = 10  # epochs of the CAS classifier on the real train images
    cas_max_train_images: int = 0  # 0 = all; else an evenly spaced subset of that many
    num_workers: int = 2  # image decoding processes for the real images of `prior eval`
# --- end of the token prior ----------------------------------------------------------------------


@dataclass
class ToleranceConfig:
    sigmas: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    limit: int = 256
    batch_size: int = 32
    num_workers: int = 2  # image decoding processes
    seed: int = 0  # the one noise draw shared by every sigma
    # rFID and LPIPS on the curve use the evaluation's metric networks: eval.fid_weights, eval.lpips_weights


@dataclass
class DistConfig:
    # how long a collective waits for the other ranks before the job stops, naming the phase it was in
    timeout_minutes: float = 60.0


@dataclass
class RevqConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    rectifier: RectifierSpec = field(default_factory=RectifierSpec)  # the rectifier library's own spec
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for every URL location (an explicit endpoint; credentials from the standard places)."""
        return storage.storage_options(self.storage.endpoint_url)


# Keys that older versions wrote into a run's config.yaml, and what took their place. A recorded config
# that holds one still loads (the key is left out and said so); a config or --set that passes one is refused.
RETIRED_KEYS = {
    "train.bf16": "train.precision (fp32 | tf32 | bf16)",
    "vae.autocast_bf16": "vae.precision (fp32 | tf32 | bf16)",
}

CHOICES = {
    "quantizer.init": INIT_METHODS,
    "train.data_on_device": RESIDENCY,
    "train.precision": PRECISIONS,
    "vae.precision": PRECISIONS,
    "encode.latent_dtype": LATENT_DTYPES,
    "tokenize.augment": AUGMENTS,
    "prior.precision": PRECISIONS,
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
        _apply_preset(cfg, find_config(config_file), chain=())
    for item in overrides or []:
        key, value = _split_override(item)
        _assign(cfg, key, _yaml(value, f"--set {item}"), origin=f"--set {item}")
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
    """Rebuild a config from a resolved dict (for example a run's config.yaml); keys an older version
    recorded (RETIRED_KEYS) are left out, and the log says which."""
    cfg = RevqConfig()
    retired = [f"{section}.{key}" for section, values in data.items() if isinstance(values, dict)
               for key in values if f"{section}.{key}" in RETIRED_KEYS]
    if retired:
        log(f"{origin} was written by an older revq-pipe: left out {', '.join(retired)} (replaced by "
            f"{'; '.join(RETIRED_KEYS[key] for key in retired)}); those settings take their defaults")
        data = {section: ({k: v for k, v in values.items() if f"{section}.{k}" not in RETIRED_KEYS}
                          if isinstance(values, dict) else values) for section, values in data.items()}
    _apply_mapping(cfg, data, origin=origin)
    _validate(cfg)
    return cfg


# --- internals ------------------------------------------------------------------------


def preset_names() -> list[str]:
    """The shipped presets, by name ("_name.yaml" is a base that presets extend, not a preset of its own)."""
    return sorted(f.name[:-len(".yaml")] for f in PRESETS.iterdir()
                  if f.name.endswith(".yaml") and not f.name.startswith("_"))


def find_config(name_or_path: str | os.PathLike, relative_to: Any = None) -> Any:
    """The YAML file `--config` (or an `extends:`) names: an existing file, else a shipped preset by name.

    A relative path is taken against the current folder, or for an `extends:` against the folder of the
    file that says it (`relative_to`). Returns a Path, or the Traversable of a shipped preset.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / text
    if path.is_file():
        return path.resolve()
    stem = text[:-len(".yaml")] if text.endswith(".yaml") else text
    if "/" not in stem and PRESETS.joinpath(f"{stem}.yaml").is_file():
        return PRESETS.joinpath(f"{stem}.yaml")
    shipped = Path(stem).name
    hint = (f"; the shipped preset of that name is --config {shipped}" if shipped in preset_names() else "")
    where = path if relative_to is not None else Path(os.path.abspath(path))
    raise ConfigError(f"config {text!r} is no file (nothing at {where}) and no shipped preset{hint}. Pass --config "
                      f"with a YAML file, or a preset by name: {', '.join(preset_names())}")


EXTENDS = "extends"  # a preset's top-level key naming the preset (or file) it builds on


def _apply_preset(cfg: RevqConfig, source: Any, chain: tuple[str, ...]) -> None:
    """Apply a YAML preset: first the one it `extends` (recursively), then its own sections."""
    origin = str(source)
    if origin in chain:
        raise ConfigError(f"{origin}: '{EXTENDS}' makes a cycle ({' -> '.join([*chain, origin])}); remove one link")
    data = _yaml(source.read_text(), f"config file {origin}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {origin} must hold a mapping of sections, got {type(data).__name__}")
    parent = data.pop(EXTENDS, None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{origin}: '{EXTENDS}' must name one preset or YAML file, got {parent!r}")
        _apply_preset(cfg, find_config(parent, relative_to=_parent_of(source)), (*chain, origin))
    _apply_mapping(cfg, data, origin=origin)


def _parent_of(source: Any) -> Any:
    """The folder of a preset file (a Path, or the shipped presets' Traversable)."""
    return source.parent if isinstance(source, Path) else PRESETS


def override_keys(overrides: list[str] | None) -> set[str]:
    """The keys a list of `--set key=value` items names."""
    return {_split_override(item)[0] for item in overrides or []}


def _yaml(text: str, what: str) -> Any:
    """Parsed YAML, or a ConfigError that names `what` and the first line of the parser's message."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what} is not valid YAML ({getattr(error, 'problem', None) or error}{where}); fix it "
                          "(a --set value is read as YAML: quote a string that YAML reads otherwise)") from None


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
    if dotted in RETIRED_KEYS:
        raise ConfigError(f"{origin}: {dotted} is no longer a setting; use {RETIRED_KEYS[dotted]}")
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
        if isinstance(value, str):  # --set key=a,b,c
            value = [part.strip() for part in value.split(",") if part.strip()]
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
    """Fill "{root}" (paths.root) and then "{run}" (train.run) in every string setting ("{split}" is left for
    the stage) and make local paths absolute; a VAE source becomes absolute only when it is an existing local
    folder (else it may be a hub id, which FrozenVAE.load tells apart)."""
    _fill(cfg, "{root}", cfg.paths.root)
    cfg.train.run = absolute_location(cfg.train.run)
    _fill(cfg, "{run}", cfg.train.run)
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        setattr(getattr(cfg, section), key, absolute_location(value))
    if cfg.vae.source and Path(cfg.vae.source).expanduser().exists():
        cfg.vae.source = absolute_location(cfg.vae.source)


def _fill(cfg: RevqConfig, placeholder: str, value: str) -> None:
    for section_field in dataclasses.fields(cfg):
        section = getattr(cfg, section_field.name)
        for f in dataclasses.fields(section):
            text = getattr(section, f.name)
            if isinstance(text, str) and placeholder in text:
                setattr(section, f.name, text.replace(placeholder, value))


def absolute_location(value: str) -> str:
    """A URL or "" as it is; a local path (or glob / brace pattern) made absolute against the current folder.

    A URL that lost a slash ("s3:/bucket/key", what pathlib makes of "s3://bucket/key") is refused, never
    made into a local folder of that name.
    """
    if not value or is_url(value):
        return value
    try:
        storage.local_path(value)
    except storage.StorageError as error:
        raise ConfigError(str(error)) from None
    return os.path.abspath(os.path.expanduser(value))


def _validate(cfg: RevqConfig) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(allowed)}")
    try:
        cfg.rectifier.check()  # the spec's own rules (pipeline/rectifier_spec.py), the ones the rectifier builds by
    except ValueError as error:
        raise ConfigError(str(error)) from None
    positive = [
        "data.resolution", "encode.batch_size", "encode.chunk_size", "quantizer.num_tokens",
        "quantizer.codebook_size", "train.epochs", "train.batch_size", "eval.batch_size", "tokenize.batch_size",
        "tokenize.chunk_size", "tolerance.batch_size", "dist.timeout_minutes",
        "prior.width", "prior.depth", "prior.heads", "prior.code_width", "prior.epochs", "prior.batch_size",
        "prior.lr", "prior.temperature", "prior.eval_samples_per_class", "prior.cas_epochs",
        "adapt.steps", "adapt.codebook_lr", "adapt.rectifier_lr",
    ]
    for dotted in positive:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{dotted}={value} must be positive")
    if not 0.0 < cfg.train.final_lr_fraction <= 1.0:
        raise ConfigError(f"train.final_lr_fraction={cfg.train.final_lr_fraction} must be in (0, 1]")
    if cfg.train.shuffle_window < 0:
        raise ConfigError(f"train.shuffle_window={cfg.train.shuffle_window} must be 0 (the whole split) or a "
                          "number of samples")
    unknown = [part for part in cfg.adapt.train if part not in ADAPTABLE]
    if unknown or not set(cfg.adapt.train) & set(TRAINABLE):
        raise ConfigError(f"adapt.train={cfg.adapt.train} (--train) must name some of {', '.join(ADAPTABLE)}, at "
                          f"least one of {' or '.join(TRAINABLE)}: statistics alone give the optimizer nothing to "
                          "train")
    if min(cfg.adapt.epochs, cfg.adapt.min_epochs) < 0:
        raise ConfigError(f"adapt.epochs={cfg.adapt.epochs} and adapt.min_epochs={cfg.adapt.min_epochs} must be 0 "
                          "or more (adapt.epochs=0: as many as adapt.steps take)")
    unknown = [part for part in cfg.train.trainable if part not in TRAINABLE]
    if unknown or not cfg.train.trainable:
        raise ConfigError(f"train.trainable={cfg.train.trainable} must name one or both of {', '.join(TRAINABLE)}")
    if cfg.train.gate_holdout < 0:
        raise ConfigError(f"train.gate_holdout={cfg.train.gate_holdout} must be 0 (automatic) or a number of latents")
    if not 0.0 <= cfg.quantizer.reset_fraction <= 1.0:
        raise ConfigError(f"quantizer.reset_fraction={cfg.quantizer.reset_fraction} must be in [0, 1]")
    if not 0.0 <= cfg.prior.class_dropout < 1.0 or not 0.0 < cfg.prior.final_lr_fraction <= 1.0:
        raise ConfigError(f"prior.class_dropout={cfg.prior.class_dropout} must be in [0, 1) and prior.final_lr_fraction="
                          f"{cfg.prior.final_lr_fraction} in (0, 1]")
    if cfg.prior.top_k < 0 or cfg.prior.cas_max_train_images < 0 or cfg.prior.warmup_steps < 0:
        raise ConfigError(f"prior.top_k={cfg.prior.top_k}, prior.cas_max_train_images="
                          f"{cfg.prior.cas_max_train_images} and prior.warmup_steps={cfg.prior.warmup_steps} "
                          "must be 0 or more")
