"""The `revq-pipe` command line: a thin map from subcommand to a stage function.

Every command takes `--config FILE_OR_PRESET` and repeatable `--set section.key=value`; explicit flags
win over both, and a flag left out (None) never overrides the YAML. Inputs named on the command line
are checked here, before a stage (and torch) is imported; expected failures are one red line
(`--debug` or REVQ_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from braceexpand import braceexpand
from typer.core import TyperCommand, TyperGroup

from revq_pipe.cache import storage
from revq_pipe.pipeline.choices import AUGMENTS
from revq_pipe.stages.config import RevqConfig, load_config, override_keys, preset_names


class _Group(TyperGroup):
    """Lists each subcommand with the whole first sentence of its help (click cuts it at the width with "...")."""

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        rows = [(name, command.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class _Command(TyperCommand):
    """Shows an argument as its metavar alone (typer writes `{SRC}` in the usage line and `SRC <str>` below)."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [self.options_metavar, *(p.metavar or p.name.upper() for p in self.get_params(ctx)
                                        if p.param_type_name == "argument")]

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        arguments = [(p.metavar or p.name.upper(), (p.help or "") + ("  [required]" if p.required else ""))
                     for p in self.get_params(ctx) if p.param_type_name == "argument"]
        options = [record for p in self.get_params(ctx)
                   if p.param_type_name == "option" and (record := p.get_help_record(ctx)) is not None]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    cls=_Group,
    help="Turn a frozen image VAE into a discrete visual tokenizer (ReVQ) on cached latents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: metavars such as DIR and STORE, no "<bool>" type column
)
cache_app = typer.Typer(cls=_Group, help="Inspect and import latent caches.", no_args_is_help=True)
demo_app = typer.Typer(cls=_Group, help="Build the embedded demo's images and VAE.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(demo_app, name="demo")


_DEBUG = {"on": False}  # the --debug of this invocation, set by the root callback before any command runs


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", envvar="REVQ_DEBUG",
                                        help="Show the traceback of a failure instead of one line.")
             ) -> None:
    _DEBUG["on"] = debug


ConfigOption = typer.Option(None, "--config", metavar="FILE_OR_PRESET",
                            help="A YAML file, or a shipped preset by name: " + ", ".join(preset_names()) + ".")
SetOption = typer.Option(None, "--set", metavar="KEY=VALUE",
                         help="Override one setting, e.g. --set train.epochs=10 (repeatable; `revq-pipe config` "
                              "lists every key).")


DEFAULTS = load_config()  # the built-in defaults as they resolve here, shown in --help


def _default(key: str) -> str:
    """'[default: key = value]' with the value the built-in defaults resolve to in this folder."""
    section, name = key.split(".")
    return f"[default: {key} = {getattr(getattr(DEFAULTS, section), name)}]"


def _config(config: Optional[str], overrides: Optional[list[str]], flags: dict[str, Any]) -> RevqConfig:
    return load_config(config, overrides or [], flags)


def _run_config(config: Optional[str], overrides: Optional[list[str]], flags: dict[str, Any],
                run_key: str = "train.run") -> RevqConfig:
    """The config of a command given a run (a training run, or with run_key="prior.run" a prior's): what the
    run recorded (its data, caches, token stores) and what its tokenizer decides (the image side, its VAE)
    take the place of the built-in defaults (stages/run_dir.py `run_base_config`), under the YAML preset,
    --set and the flags."""
    from revq_pipe.stages.console import log
    from revq_pipe.stages.run_dir import CONFIG_NAME, images_of_cache, run_base_config

    section, key = run_key.split(".")
    run = getattr(getattr(_config(config, overrides, flags), section), key)
    base, recorded = run_base_config(run)
    if recorded is not None:
        log(f"using the settings recorded in {Path(run) / CONFIG_NAME} (data, caches), under any --config, "
            "--set and flags given")
    cfg = load_config(config, [*(overrides or []), f"{run_key}={run}"], flags, base=base)
    for split in ("train", "val"):  # a split's images are where its cache was encoded from, unless named now
        key = f"{split}_images"
        if recorded is not None and getattr(cfg.data, key) == getattr(recorded.data, key):
            images = images_of_cache(getattr(cfg.data, f"{split}_cache"), cfg.storage_options())
            if images:
                setattr(cfg.data, key, images)
    return cfg


def _train_config(config: Optional[str], overrides: Optional[list[str]], flags: dict[str, Any]) -> RevqConfig:
    """The config of `train`: an existing run starts from the config it recorded, and only what is passed now
    (the YAML preset, --set, the flags) is compared with it on resume. The run is extended only when asked
    with --epochs or --set train.epochs, never by a preset's train.epochs."""
    from revq_pipe.stages.console import log
    from revq_pipe.stages.run_dir import CONFIG_NAME, recorded_config

    run = _config(config, overrides, flags).train.run
    recorded = recorded_config(run)
    if recorded is None:
        return _config(config, overrides, flags)
    log(f"{run} exists: starting from the settings recorded in its {CONFIG_NAME}; what is passed now is checked "
        "against them")
    cfg = load_config(config, [*(overrides or []), f"train.run={run}"], flags, base=recorded)
    asked = flags.get("train.epochs") is not None or "train.epochs" in override_keys(overrides)
    if not asked and cfg.train.epochs != recorded.train.epochs:
        log(f"keeping the run's train.epochs={recorded.train.epochs}: a preset's train.epochs={cfg.train.epochs} "
            f"does not extend a run (pass --epochs {cfg.train.epochs} to extend it)")
        cfg.train.epochs = recorded.train.epochs
    return cfg


def _split_paths(split: str) -> tuple[str, str]:
    """The config keys holding a split's image source and latent cache."""
    if split not in ("train", "val"):
        return "", ""
    return f"data.{split}_images", f"data.{split}_cache"


def _fail_cleanly(work: Callable[[], Any]) -> Any:
    """Run a stage; expected failures (bad input, an object store that refuses or cannot be reached) become one
    red line and exit code 2, not a traceback; with --debug (or REVQ_DEBUG=1) they raise as they are."""
    from revq_pipe.cache.schema import CacheError

    try:
        return work()
    except Exception as error:
        if _DEBUG["on"]:
            raise
        expected = (ValueError, FileNotFoundError, FileExistsError, CacheError, storage.StorageError)
        message = str(error) if isinstance(error, expected) else storage.describe_failure(error)
        if message is None:
            raise
        from revq_pipe.stages.console import console

        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def _require_inputs(cfg: RevqConfig, inputs: list[tuple[str, str | None, str]], outputs: tuple = ()) -> None:
    """Refuse inputs that are not there before anything heavy is imported or loaded.

    `inputs` are (what, location, how to fix it): a local path must exist (every file of a brace pattern, at
    least one of a glob); an object-store location, input or output, must be reachable with the credentials
    at hand (storage.check_access: one listing). Unset (None or "") locations are skipped.
    """
    for what, location, fix in inputs:
        if not location:
            continue
        if storage.is_url(location):
            storage.check_access(location, cfg.storage_options())
        elif (missing := _missing_local(location)) is not None:
            detail = "" if missing == os.path.abspath(os.path.expanduser(location)) else f" (first missing: {missing})"
            raise FileNotFoundError(f"{what} {location} does not exist{detail}; {fix}")
    for location in outputs:
        if location and storage.is_url(location):
            storage.check_access(location, cfg.storage_options())


def _missing_local(location: str) -> str | None:
    """The first local file a path or pattern names that is not there, or None."""
    text = os.path.abspath(os.path.expanduser(location))
    if "{" in text and "}" in text:
        return next((path for path in braceexpand(text) if not os.path.exists(path)), None)
    if any(c in text for c in "*?["):
        return None if glob.glob(text) else text
    return None if os.path.exists(text) else text


def _named_vae(cfg: RevqConfig) -> list[tuple[str, str | None, str]]:
    """The VAE as an input to check when it names a local folder (an absolute path; anything else may be a hub id)."""
    source = os.path.expanduser(cfg.vae.source)
    fix = "pass --vae with a local diffusers VAE folder (holding config.json and the weights) or a hub id"
    return [("VAE folder", source, fix)] if os.path.isabs(source) else []


@app.command("config")
def show_config(
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
    run: Optional[str] = typer.Option(None, metavar="DIR", help="Start from what this training run recorded."),
) -> None:
    """Print the resolved config (every --set key with its value, paths as they resolve) and exit."""

    def work():
        import yaml

        from revq_pipe.stages.config import config_to_dict

        cfg = _run_config(config, set_, {"train.run": run}) if run else _config(config, set_, {})
        typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), nl=False)

    _fail_cleanly(work)


@app.command()
def encode(
    images: Optional[str] = typer.Option(None, metavar="PATH",
                                         help="ImageFolder tree, .tar shard(s), glob or brace pattern "
                                              "[default: data.<split>_images; train: " + DEFAULTS.data.train_images + "]."),
    vae: Optional[str] = typer.Option(None, metavar="PATH_OR_ID",
                                      help="Local VAE folder or hub id " + _default("vae.source") + "."),
    out: Optional[str] = typer.Option(None, metavar="STORE", help="Zarr store to write [default: data.<split>_cache; train: "
                                                                    + DEFAULTS.data.train_cache + "]."),
    split: str = typer.Option("train", metavar="NAME", help="Split name recorded in the store."),
    resolution: Optional[int] = typer.Option(None, metavar="R", help="Image side in pixels " + _default("data.resolution") + "."),
    batch_size: Optional[int] = typer.Option(None, metavar="B", help="VAE batch size " + _default("encode.batch_size") + "."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty target store."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Stage one: run the frozen VAE encoder over a dataset into a latent cache."""
    images_key, cache_key = _split_paths(split)
    if not images_key and (images is None or out is None):
        raise typer.BadParameter(f"split {split!r} has no configured paths; pass --images and --out", param_hint="--split")
    flags = {"vae.source": vae, "data.resolution": resolution, "encode.batch_size": batch_size}
    if images_key:
        flags.update({images_key: images, cache_key: out})

    def work():
        from revq_pipe.stages.config import absolute_location

        cfg = _config(config, set_, flags)
        source = absolute_location(images) if images is not None else getattr(cfg.data, f"{split}_images")
        store = absolute_location(out) if out is not None else getattr(cfg.data, f"{split}_cache")
        _require_inputs(cfg, [("image source", source, "pass --images with an ImageFolder tree, .tar shard(s), a glob "
                               "or a brace pattern (`revq-pipe demo images` writes the demo's)"), *_named_vae(cfg)],
                        outputs=(store,))
        from revq_pipe.stages.encode import run_encode

        run_encode(cfg, split=split, images=source, out=store, overwrite=overwrite)

    _fail_cleanly(work)


@app.command()
def train(
    train_cache: Optional[str] = typer.Option(None, metavar="STORE", help="Training latent cache "
                                                                          + _default("data.train_cache") + "."),
    val_cache: Optional[str] = typer.Option(None, metavar="STORE", help="Validation latent cache "
                                                                        + _default("data.val_cache") + "."),
    run: Optional[str] = typer.Option(None, metavar="DIR", help="Run directory; an existing one resumes, starting "
                                                                "from the settings it recorded "
                                                                + _default("train.run") + "."),
    epochs: Optional[int] = typer.Option(None, metavar="N", help="Number of epochs; more than a finished run "
                                                                 "has extends it " + _default("train.epochs") + "."),
    init_from: Optional[str] = typer.Option(None, "--init-from", metavar="DIR",
                                            help="Start codebooks, rectifier and statistics from this tokenizer "
                                                 "folder (trained or imported) [default: train.init_from]."),
    push_to: Optional[str] = typer.Option(None, "--push-to", metavar="URL",
                                          help="Copy the finished tokenizer/ there, e.g. s3://bucket/tokenizers/a "
                                               "(the run directory stays local) [default: train.push_to]."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Stage two: train the multi-group quantizer and the rectifier on cached latents."""
    flags = {"data.train_cache": train_cache, "data.val_cache": val_cache, "train.run": run,
             "train.epochs": epochs, "train.init_from": init_from, "train.push_to": push_to}

    def work():
        from revq_pipe.stages.config import absolute_location

        cache_fix = "create it with `revq-pipe encode`, or fix the path"
        _require_inputs(_config(config, set_, flags),
                        [("latent cache", train_cache and absolute_location(train_cache), cache_fix),
                         ("latent cache", val_cache and absolute_location(val_cache), cache_fix),
                         ("tokenizer folder", init_from and absolute_location(init_from),
                          "pass --init-from with a tokenizer/ folder of a finished or imported run")],
                        outputs=(push_to,))
        cfg = _train_config(config, set_, flags)
        from revq_pipe.stages.train import run_train

        run_train(cfg)

    _fail_cleanly(work)


@app.command()
def adapt(
    source: str = typer.Option(..., "--from", metavar="TOKENIZER",
                               help="The tokenizer to adapt: a tokenizer/ folder of a finished or imported run."),
    train_cache: str = typer.Option(..., metavar="STORE", help="The new domain's training latent cache."),
    val_cache: str = typer.Option(..., metavar="STORE", help="The new domain's validation latent cache."),
    run: str = typer.Option(..., metavar="DIR", help="Run directory for the adapted tokenizer; an existing one "
                                                     "resumes."),
    train: Optional[str] = typer.Option(None, "--train", metavar="PARTS",
                                        help="What adapts, comma-separated: codebooks, rectifier, statistics "
                                             "[default: adapt.train = rectifier]."),
    epochs: Optional[int] = typer.Option(None, metavar="N", help="Epochs [default: adapt.steps optimizer steps]."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Adapt a tokenizer to a new domain's latents; each epoch reports the starting tokenizer beside the adapted one."""
    flags = {"data.train_cache": train_cache, "data.val_cache": val_cache, "train.run": run,
             "adapt.train": train,  # "a,b" becomes a list like any list setting
             "adapt.epochs": epochs}

    def work():
        from revq_pipe.stages.config import absolute_location

        cache_fix = "create it with `revq-pipe encode` on the new domain's images, or fix the path"
        _require_inputs(_config(config, set_, flags),
                        [("latent cache", absolute_location(train_cache), cache_fix),
                         ("latent cache", absolute_location(val_cache), cache_fix),
                         ("tokenizer folder", absolute_location(source),
                          "pass --from with the tokenizer/ folder of a finished or imported run")])
        cfg = _train_config(config, set_, flags)
        from revq_pipe.stages.adapt import run_adapt

        run_adapt(cfg, source=absolute_location(source))

    _fail_cleanly(work)


RunOption = typer.Option(None, metavar="DIR", help="Training run holding tokenizer/; its recorded data and VAE "
                                                   "are used unless named here " + _default("train.run") + ".")
VaeOption = typer.Option(None, metavar="PATH_OR_ID",
                         help="Local VAE folder or hub id [default: the VAE the tokenizer records].")


def _run_inputs(run: str | None) -> list[tuple[str, str | None, str]]:
    """The run directory named by --run, as an input to check (a default one is the stage's to explain)."""
    from revq_pipe.stages.config import absolute_location

    return [("run directory", run and absolute_location(run), "pass --run with the directory of a `revq-pipe train` "
             "run (or of `revq-pipe import-reference`)")]


@app.command("eval")
def evaluate(
    split: str = typer.Option("val", metavar="NAME", help="Split to evaluate."),
    run: Optional[str] = RunOption,
    images: Optional[str] = typer.Option(None, metavar="PATH", help="Images of the split [default: the run's "
                                                                    "data.<split>_images]."),
    vae: Optional[str] = VaeOption,
    fid_weights: Optional[str] = typer.Option(None, metavar="FILE",
                                              help="pt_inception-2015-12-05 weights file (or REVQ_FID_WEIGHTS)."),
    lpips_weights: Optional[str] = typer.Option(None, metavar="PATH",
                                                help="LPIPS AlexNet weights (or REVQ_LPIPS_WEIGHTS)."),
    limit: Optional[int] = typer.Option(None, metavar="N", help="Evaluate only the first N images; the report is "
                                                                "eval_<split>_first<N>.json."),
    from_cache: bool = typer.Option(False, "--from-cache", help="Latent-level evaluation on the split's cache "
                                                                "(eval_<split>_latents.json)."),
    cache: Optional[str] = typer.Option(None, metavar="STORE", help="The cache for --from-cache [default: the run's "
                                                                    "data.<split>_cache]."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Evaluate images -> tokens -> images against the continuous VAE's own ceiling."""
    images_key, cache_key = _split_paths(split)
    flags = {"train.run": run, "vae.source": vae, "eval.fid_weights": fid_weights,
             "eval.lpips_weights": lpips_weights, "eval.limit": limit}
    if images_key:  # what the command is given is what its resolved config records
        flags.update({images_key: images, cache_key: cache})

    def work():
        from revq_pipe.stages.config import absolute_location

        _require_inputs(_config(config, set_, flags), [
            *_run_inputs(run), ("image source", images and absolute_location(images), "fix --images"),
            ("latent cache", cache and absolute_location(cache), "fix --cache"),
            ("FID weights file", fid_weights and absolute_location(fid_weights), "fix --fid-weights"),
            ("LPIPS weights", lpips_weights and absolute_location(lpips_weights), "fix --lpips-weights")])
        cfg = _run_config(config, set_, flags)
        from revq_pipe.stages.evaluate import run_evaluate

        run_evaluate(cfg, run=cfg.train.run, split=split, images=images and absolute_location(images),
                     from_cache=from_cache, cache=cache and absolute_location(cache))

    _fail_cleanly(work)


@app.command()
def tokenize(
    run: Optional[str] = RunOption,
    split: Optional[str] = typer.Option(None, metavar="NAME", help="Split name recorded in the store [default: the "
                                                                   "cache's split; needed with --images]."),
    images: Optional[str] = typer.Option(None, metavar="PATH", help="Tokenize these images through the VAE."),
    cache: Optional[str] = typer.Option(None, metavar="STORE", help="Tokenize the latents of this cache instead."),
    out: Optional[str] = typer.Option(None, metavar="STORE", help="Token store to write " + _default("tokenize.out") + "."),
    augment: Optional[str] = typer.Option(None, metavar="|".join(AUGMENTS),
                                          help="Store every view of every image, one row per view "
                                               + _default("tokenize.augment") + "."),
    vae: Optional[str] = VaeOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty target store."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Export the token ids of a whole split to Zarr for generative models."""
    if images is not None and cache is not None:
        raise typer.BadParameter("pass either --images or --cache, not both", param_hint="--images/--cache")
    flags = {"train.run": run, "tokenize.out": out, "tokenize.augment": augment, "vae.source": vae}

    def work():
        from revq_pipe.stages.config import absolute_location

        _require_inputs(_config(config, set_, flags), [
            *_run_inputs(run), ("image source", images and absolute_location(images), "fix --images"),
            ("latent cache", cache and absolute_location(cache), "fix --cache")], outputs=(out,))
        cfg = _run_config(config, set_, flags)
        from revq_pipe.stages.run_dir import split_location
        from revq_pipe.stages.tokenize import run_tokenize

        source_images = images and absolute_location(images)
        if images is None and cache is None:
            if split is None:
                raise ValueError("pass --split NAME (with the run's data.<split>_images), --images PATH with --split, "
                                 "or --cache STORE")
            source_images = split_location(cfg, split, "images")
        run_tokenize(cfg, run=cfg.train.run, split=split, images=source_images, cache=cache and absolute_location(cache),
                     out=cfg.tokenize.out, overwrite=overwrite)

    _fail_cleanly(work)


@app.command()
def tolerance(
    run: Optional[str] = RunOption,
    images: Optional[str] = typer.Option(None, metavar="PATH", help="Validation images [default: the run's "
                                                                    "data.val_images]."),
    vae: Optional[str] = VaeOption,
    fid_weights: Optional[str] = typer.Option(None, metavar="FILE", help="FID weights, to add rFID to the curve."),
    lpips_weights: Optional[str] = typer.Option(None, metavar="PATH", help="LPIPS weights."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Measure how much latent noise the frozen decoder tolerates, with the tokenizer on the curve."""
    flags = {"train.run": run, "vae.source": vae, "data.val_images": images, "eval.fid_weights": fid_weights,
             "eval.lpips_weights": lpips_weights}

    def work():
        from revq_pipe.stages.config import absolute_location

        _require_inputs(_config(config, set_, flags), [
            *_run_inputs(run), ("image source", images and absolute_location(images), "fix --images"),
            ("FID weights file", fid_weights and absolute_location(fid_weights), "fix --fid-weights"),
            ("LPIPS weights", lpips_weights and absolute_location(lpips_weights), "fix --lpips-weights")])
        cfg = _run_config(config, set_, flags)
        from revq_pipe.stages.tolerance import run_tolerance

        typer.echo(str(run_tolerance(cfg, run=cfg.train.run, images=cfg.data.val_images)))

    _fail_cleanly(work)


@app.command("import-reference", cls=_Command)
def import_reference(
    src: str = typer.Argument(..., metavar="SRC", help="Folder with a published ReVQ tokenizer's yaml + ckpt.pth, or its hub id "
                                        "(AndyRaoTHU/revq-512T, -256T-B, -256T-L)."),
    out: str = typer.Option(..., metavar="DIR", help="Folder to write; the tokenizer lands in OUT/tokenizer (then --run OUT)."),
    preprocessor: Optional[str] = typer.Option(None, metavar="FILE", help="The reference's ckpt/preprocessor.pth "
                                                          "(default SRC/preprocessor.pth)."),
    vae: Optional[str] = typer.Option(None, metavar="PATH_OR_ID", help="The VAE the tokenizer was trained on (local folder or hub id), "
                                                 "to record its weights hash."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the tokenizer of an earlier import in OUT."),
) -> None:
    """Import a tokenizer published with the ReVQ reference code as an ordinary tokenizer folder."""

    def work():
        from revq_pipe.stages.import_reference import run_import_reference

        target = run_import_reference(src, out, preprocessor=preprocessor, vae=vae, overwrite=overwrite)
        typer.echo(str(target))

    _fail_cleanly(work)


@cache_app.command("info", cls=_Command)
def cache_info(
    store: str = typer.Argument(..., metavar="STORE", help="A latent cache (Zarr store, local path or URL)."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Print a cache's manifest and statistics."""

    def work():
        from revq_pipe.stages.config import absolute_location

        cfg = _config(config, set_, {})
        _require_inputs(cfg, [("latent cache", absolute_location(store), "pass a store written by `revq-pipe encode` "
                               "or `revq-pipe cache import`")])
        from revq_pipe.cache.reader import cache_info as describe

        typer.echo(json.dumps(describe(absolute_location(store), cfg.storage_options()), indent=2, default=str))

    _fail_cleanly(work)


@cache_app.command("import", cls=_Command)
def cache_import(
    src: str = typer.Argument(..., metavar="FILE", help="An (N, C, H, W) tensor in .npy or .pt."),
    out: str = typer.Option(..., metavar="STORE", help="Zarr store to write."),
    split: str = typer.Option(..., metavar="NAME", help="Split name recorded in the store."),
    labels: Optional[str] = typer.Option(None, metavar="FILE", help="Labels (.npy, .pt or one integer per line)."),
    vae: Optional[str] = typer.Option(None, metavar="PATH_OR_ID", help="Record this VAE's identity (local folder or hub id)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty target store."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Build a latent cache from latents extracted elsewhere, without re-encoding."""

    def work():
        from revq_pipe.stages.config import absolute_location

        cfg = _config(config, set_, {"vae.source": vae})
        _require_inputs(cfg, [("latent tensor file", absolute_location(src), "pass an (N, C, H, W) .npy or .pt file"),
                              ("labels file", labels and absolute_location(labels), "fix --labels"),
                              *(_named_vae(cfg) if vae is not None else [])], outputs=(absolute_location(out),))
        from revq_pipe.cache.importer import import_tensor

        identity = None
        if vae is not None:
            from revq_pipe.pipeline.vae import FrozenVAE

            identity = FrozenVAE.load(cfg.vae.source, device="cpu").identity
        manifest = import_tensor(src, absolute_location(out), split=split, labels_path=labels, vae_identity=identity,
                                 overwrite=overwrite, chunk_size=cfg.encode.chunk_size,
                                 latent_dtype=cfg.encode.latent_dtype, options=cfg.storage_options())
        typer.echo(f"imported {manifest.num_samples} latents into {out}")

    _fail_cleanly(work)


@demo_app.command("images")
def demo_images(
    out: Optional[str] = typer.Option(None, metavar="DIR",
                                      help="Folder for the demo images [default: ROOT/demo/images]."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Write the demo's train and val images (webdataset shards and folders)."""

    def work():
        from revq_pipe.demo.images import write_demo_images

        cfg = _config(config, set_, {})
        summary = write_demo_images(Path(out or f"{cfg.paths.root}/demo/images"))
        typer.echo(json.dumps(summary, indent=2, default=str))

    _fail_cleanly(work)


@demo_app.command("train-vae")
def demo_train_vae(
    images: Optional[str] = typer.Option(None, metavar="DIR",
                                         help="Demo train image folder [default: ROOT/demo/images/train]."),
    out: Optional[str] = typer.Option(None, metavar="DIR", help="Where to save the trained AutoencoderDC "
                                                                "[default: ROOT/demo/vae]."),
    steps: int = typer.Option(1200, metavar="N", help="Optimizer steps (the committed demo VAE used 1200)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder (e.g. the "
                                                              "committed demo/vae, which caches and tokenizers "
                                                              "made with it record by hash)."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Train the small demo AutoencoderDC that the embedded demo encodes with."""

    def work():
        cfg = _config(config, set_, {})
        _require_inputs(cfg, [("demo image folder", images or f"{cfg.paths.root}/demo/images/train",
                               "write it with `revq-pipe demo images`, or pass --images")])
        from revq_pipe.demo.vae_training import train_demo_vae

        summary = train_demo_vae(Path(images or f"{cfg.paths.root}/demo/images/train"),
                                 Path(out or f"{cfg.paths.root}/demo/vae"), steps=steps, overwrite=overwrite)
        typer.echo(json.dumps(summary, indent=2, default=str))

    _fail_cleanly(work)


# --- tokens and the token prior (issue 17; stages/token_export.py, stages/prior*.py) ---------------------

tokens_app = typer.Typer(cls=_Group, help="Export token stores for generative models.", no_args_is_help=True)
prior_app = typer.Typer(cls=_Group, help="A class-conditional autoregressive prior over token stores.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
app.add_typer(prior_app, name="prior")
PriorRunOption = typer.Option(None, metavar="DIR", help="Prior run directory " + _default("prior.run") + ".")


@tokens_app.command("export", cls=_Command)
def tokens_export(
    store: str = typer.Argument(..., metavar="STORE", help="A token store written by `revq-pipe tokenize`."),
    fmt: str = typer.Option(..., "--format", metavar="jsonl|npy", help="jsonl: one line {class_id, tokens, view, key} "
                                                                        "per view; npy: codes (N, V, T) + labels."),
    out: str = typer.Option(..., metavar="PATH", help="File to write (.jsonl or .npy); labels and metadata beside it."),
    flat: bool = typer.Option(False, "--flat", help="One shared vocabulary: id + t * K (undo: t = id // K)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of another export."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Write a token store in the files autoregressive trainers read."""

    def work():
        from revq_pipe.stages.config import absolute_location
        from revq_pipe.stages.token_export import run_token_export

        cfg = _config(config, set_, {})
        run_token_export(absolute_location(store), fmt=fmt, out=absolute_location(out), flat=flat, overwrite=overwrite,
                         options=cfg.storage_options())

    _fail_cleanly(work)


@prior_app.command("train")
def prior_train(
    tokens: Optional[str] = typer.Option(None, metavar="STORE", help="Training token store " + _default("prior.train_tokens") + "."),
    val_tokens: Optional[str] = typer.Option(None, metavar="STORE", help="Validation token store "
                                                                         + _default("prior.val_tokens") + "."),
    run: Optional[str] = PriorRunOption,
    epochs: Optional[int] = typer.Option(None, metavar="N", help="Epochs; more than a finished run has extends it "
                                                                 + _default("prior.epochs") + "."),
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Train the prior on a token store; an existing run directory resumes (torchrun: --set prior.run=DIR)."""
    flags = {"prior.train_tokens": tokens, "prior.val_tokens": val_tokens, "prior.run": run, "prior.epochs": epochs}

    def work():
        from revq_pipe.stages.prior import run_prior_train

        run_prior_train(_config(config, set_, flags))

    _fail_cleanly(work)


@prior_app.command("sample")
def prior_sample(
    run: Optional[str] = PriorRunOption,
    num: int = typer.Option(16, "--num", metavar="N", help="Number of samples."),
    class_id: Optional[int] = typer.Option(None, "--class", metavar="C", help="Sample this class only [default: "
                                                                             "classes 0, 1, ... in turn]."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", metavar="S", help="Classifier-free guidance scale "
                                                                               + _default("prior.cfg_scale") + "."),
    seed: int = typer.Option(0, metavar="N", help="Random seed of the samples."),
    vae: Optional[str] = VaeOption,
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Sample ids from a trained prior and a labelled grid of their decoded images (RUN/samples/)."""
    flags = {"prior.run": run, "prior.cfg_scale": cfg_scale, "vae.source": vae}

    def work():
        from revq_pipe.stages.prior_sample import run_prior_sample

        cfg = _run_config(config, set_, flags, run_key="prior.run")
        typer.echo(str(run_prior_sample(cfg, run=cfg.prior.run, num=num, class_id=class_id, seed=seed)))

    _fail_cleanly(work)


@prior_app.command("eval")
def prior_eval(
    run: Optional[str] = PriorRunOption,
    fid_weights: Optional[str] = typer.Option(None, metavar="FILE",
                                              help="pt_inception-2015-12-05 weights, for the samples' FID (or "
                                                   "REVQ_FID_WEIGHTS)."),
    seed: int = typer.Option(0, metavar="N", help="Random seed of the samples and random tokens."),
    vae: Optional[str] = VaeOption,
    config: Optional[str] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Val bits per image, class accuracy of samples vs real images vs random tokens: RUN/prior_eval.json."""
    flags = {"prior.run": run, "eval.fid_weights": fid_weights, "vae.source": vae}

    def work():
        from revq_pipe.stages.prior_eval import run_prior_eval

        cfg = _run_config(config, set_, flags, run_key="prior.run")
        typer.echo(str(run_prior_eval(cfg, run=cfg.prior.run, seed=seed)))

    _fail_cleanly(work)
# --- end of tokens and the token prior ------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
