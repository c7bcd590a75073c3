"""The `revq-pipe` command line: a thin map from subcommand to a stage function.

Every command takes `--config FILE` and repeatable `--set section.key=value`; explicit flags
win over both, and a flag left out (None) never overrides the YAML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from revq_pipe.stages.config import RevqConfig, load_config

app = typer.Typer(
    help="Turn a frozen image VAE into a discrete visual tokenizer (ReVQ) on cached latents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: metavars such as DIR and STORE, no "<bool>" type column
)
cache_app = typer.Typer(help="Inspect and import latent caches.", no_args_is_help=True)
demo_app = typer.Typer(help="Build the embedded demo's images and VAE.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(demo_app, name="demo")

ConfigOption = typer.Option(None, "--config", metavar="FILE", help="YAML preset, e.g. configs/512T.yaml.")
SetOption = typer.Option(None, "--set", metavar="KEY=VALUE",
                         help="Override one setting, e.g. --set train.epochs=10 (repeatable; `revq-pipe config` "
                              "lists every key).")


DEFAULTS = load_config()  # the built-in defaults as they resolve here, shown in --help


def _default(key: str) -> str:
    """'[default: key = value]' with the value the built-in defaults resolve to in this folder."""
    section, name = key.split(".")
    return f"[default: {key} = {getattr(getattr(DEFAULTS, section), name)}]"


def _config(config: Optional[Path], overrides: Optional[list[str]], flags: dict[str, Any]) -> RevqConfig:
    return load_config(config, overrides or [], flags)


def _run_config(config: Optional[Path], overrides: Optional[list[str]], flags: dict[str, Any]) -> RevqConfig:
    """The config of a command given a training run: what the run recorded (its data, caches, resolution)
    takes the place of the built-in defaults, under the YAML preset, --set and the flags."""
    from revq_pipe.stages.console import log
    from revq_pipe.stages.run_dir import CONFIG_NAME, images_of_cache, recorded_config

    cfg = _config(config, overrides, flags)
    recorded = recorded_config(cfg.train.run) if cfg.train.run else None
    if recorded is None:
        return cfg
    log(f"using the settings recorded in {Path(cfg.train.run) / CONFIG_NAME} (data, caches), under any --config, "
        "--set and flags given")
    cfg = load_config(config, [*(overrides or []), f"train.run={cfg.train.run}"], flags, base=recorded)
    for split in ("train", "val"):  # a split's images are where its cache was encoded from, unless named now
        key = f"{split}_images"
        if getattr(cfg.data, key) == getattr(recorded.data, key):
            images = images_of_cache(getattr(cfg.data, f"{split}_cache"), cfg.storage_options())
            if images:
                setattr(cfg.data, key, images)
    return cfg


def _split_paths(split: str) -> tuple[str, str]:
    """The config keys holding a split's image source and latent cache."""
    if split not in ("train", "val"):
        return "", ""
    return f"data.{split}_images", f"data.{split}_cache"


def _fail_cleanly(work: Callable[[], Any]) -> Any:
    """Run a stage; expected failures become one red line and exit code 2, not a traceback."""
    from revq_pipe.cache.schema import CacheError

    try:
        return work()
    except (ValueError, FileNotFoundError, FileExistsError, CacheError) as error:
        from revq_pipe.stages.console import console

        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


@app.command("config")
def show_config(
    config: Optional[Path] = ConfigOption,
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
    config: Optional[Path] = ConfigOption,
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
        from revq_pipe.stages.encode import run_encode

        cfg = _config(config, set_, flags)
        run_encode(
            cfg,
            split=split,
            images=absolute_location(images) if images is not None else getattr(cfg.data, f"{split}_images"),
            out=absolute_location(out) if out is not None else getattr(cfg.data, f"{split}_cache"),
            overwrite=overwrite,
        )

    _fail_cleanly(work)


@app.command()
def train(
    train_cache: Optional[str] = typer.Option(None, metavar="STORE", help="Training latent cache "
                                                                          + _default("data.train_cache") + "."),
    val_cache: Optional[str] = typer.Option(None, metavar="STORE", help="Validation latent cache "
                                                                        + _default("data.val_cache") + "."),
    run: Optional[str] = typer.Option(None, metavar="DIR", help="Run directory; an existing one resumes "
                                                                + _default("train.run") + "."),
    epochs: Optional[int] = typer.Option(None, metavar="N", help="Number of epochs; more than a finished run "
                                                                 "has extends it " + _default("train.epochs") + "."),
    init_from: Optional[str] = typer.Option(None, "--init-from", metavar="DIR",
                                            help="Start codebooks, rectifier and statistics from this tokenizer "
                                                 "folder (trained or imported) [default: train.init_from]."),
    push_to: Optional[str] = typer.Option(None, "--push-to", metavar="URL",
                                          help="Copy the finished tokenizer/ there, e.g. s3://bucket/tokenizers/a "
                                               "(the run directory stays local) [default: train.push_to]."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Stage two: train the multi-group quantizer and the rectifier on cached latents."""
    flags = {"data.train_cache": train_cache, "data.val_cache": val_cache, "train.run": run,
             "train.epochs": epochs, "train.init_from": init_from, "train.push_to": push_to}

    def work():
        from revq_pipe.stages.train import run_train

        run_train(_config(config, set_, flags))

    _fail_cleanly(work)


RunOption = typer.Option(None, metavar="DIR", help="Training run holding tokenizer/; its recorded data and VAE "
                                                   "are used unless named here " + _default("train.run") + ".")
VaeOption = typer.Option(None, metavar="PATH_OR_ID",
                         help="Local VAE folder or hub id [default: the VAE the tokenizer records].")


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
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Evaluate images -> tokens -> images against the continuous VAE's own ceiling."""
    flags = {"train.run": run, "vae.source": vae, "eval.fid_weights": fid_weights,
             "eval.lpips_weights": lpips_weights, "eval.limit": limit}

    def work():
        from revq_pipe.stages.config import absolute_location
        from revq_pipe.stages.evaluate import run_evaluate

        cfg = _run_config(config, set_, flags)
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
    vae: Optional[str] = VaeOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty target store."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Export the token ids of a whole split to Zarr for generative models."""
    if images is not None and cache is not None:
        raise typer.BadParameter("pass either --images or --cache, not both", param_hint="--images/--cache")
    flags = {"train.run": run, "tokenize.out": out, "vae.source": vae}

    def work():
        from revq_pipe.stages.config import absolute_location
        from revq_pipe.stages.run_dir import split_location
        from revq_pipe.stages.tokenize import run_tokenize

        cfg = _run_config(config, set_, flags)
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
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Measure how much latent noise the frozen decoder tolerates, with the tokenizer on the curve."""
    flags = {"train.run": run, "vae.source": vae, "eval.fid_weights": fid_weights,
             "eval.lpips_weights": lpips_weights}

    def work():
        from revq_pipe.stages.config import absolute_location
        from revq_pipe.stages.tolerance import run_tolerance

        cfg = _run_config(config, set_, flags)
        path = run_tolerance(cfg, run=cfg.train.run, images=absolute_location(images) if images else cfg.data.val_images)
        typer.echo(str(path))

    _fail_cleanly(work)


@app.command("import-reference")
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


@cache_app.command("info")
def cache_info(
    store: str = typer.Argument(..., metavar="STORE", help="A latent cache (Zarr store, local path or URL)."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Print a cache's manifest and statistics."""

    def work():
        from revq_pipe.cache.reader import cache_info as describe
        from revq_pipe.stages.config import absolute_location

        options = _config(config, set_, {}).storage_options()
        typer.echo(json.dumps(describe(absolute_location(store), options), indent=2, default=str))

    _fail_cleanly(work)


@cache_app.command("import")
def cache_import(
    src: str = typer.Argument(..., metavar="FILE", help="An (N, C, H, W) tensor in .npy or .pt."),
    out: str = typer.Option(..., metavar="STORE", help="Zarr store to write."),
    split: str = typer.Option(..., metavar="NAME", help="Split name recorded in the store."),
    labels: Optional[str] = typer.Option(None, metavar="FILE", help="Labels (.npy, .pt or one integer per line)."),
    vae: Optional[str] = typer.Option(None, metavar="PATH_OR_ID", help="Record this VAE's identity (local folder or hub id)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty target store."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Build a latent cache from latents extracted elsewhere, without re-encoding."""

    def work():
        from revq_pipe.cache.importer import import_tensor
        from revq_pipe.stages.config import absolute_location

        cfg = _config(config, set_, {"vae.source": vae})
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
    config: Optional[Path] = ConfigOption,
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
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Train the small demo AutoencoderDC that the embedded demo encodes with."""

    def work():
        from revq_pipe.demo.vae_training import train_demo_vae

        cfg = _config(config, set_, {})
        summary = train_demo_vae(Path(images or f"{cfg.paths.root}/demo/images/train"),
                                 Path(out or f"{cfg.paths.root}/demo/vae"), steps=steps, overwrite=overwrite)
        typer.echo(json.dumps(summary, indent=2, default=str))

    _fail_cleanly(work)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
