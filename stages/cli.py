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
from revq_pipe.stages.console import is_main_process

app = typer.Typer(
    help="Turn a frozen image VAE into a discrete visual tokenizer (ReVQ) on cached latents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect and import latent caches.", no_args_is_help=True)
demo_app = typer.Typer(help="Build the embedded demo's images and VAE.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(demo_app, name="demo")

ConfigOption = typer.Option(None, "--config", help="YAML preset, e.g. configs/512T.yaml.")
SetOption = typer.Option(None, "--set", help="Override one setting: section.key=value (repeatable).")


def _config(config: Optional[Path], overrides: Optional[list[str]], flags: dict[str, Any]) -> RevqConfig:
    return load_config(config, overrides or [], flags)


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


@app.command()
def encode(
    images: Optional[str] = typer.Option(None, help="ImageFolder tree, .tar shard(s), glob or brace pattern."),
    vae: Optional[str] = typer.Option(None, help="Local VAE folder or hub id (vae.source)."),
    out: Optional[str] = typer.Option(None, help="Zarr store to write (default data.<split>_cache)."),
    split: str = typer.Option("train", help="Split name recorded in the store."),
    resolution: Optional[int] = typer.Option(None, help="Image side in pixels (data.resolution)."),
    batch_size: Optional[int] = typer.Option(None, help="VAE batch size (encode.batch_size)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty target store."),
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
        from revq_pipe.stages.encode import run_encode

        cfg = _config(config, set_, flags)
        run_encode(
            cfg,
            split=split,
            images=images if images is not None else getattr(cfg.data, f"{split}_images"),
            out=out if out is not None else getattr(cfg.data, f"{split}_cache"),
            overwrite=overwrite,
        )

    _fail_cleanly(work)


@app.command()
def train(
    train_cache: Optional[str] = typer.Option(None, help="Training latent cache (data.train_cache)."),
    val_cache: Optional[str] = typer.Option(None, help="Validation latent cache (data.val_cache)."),
    run: Optional[str] = typer.Option(None, help="Run directory; an existing one resumes (train.run)."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs (train.epochs)."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Stage two: train the multi-group quantizer and the rectifier on cached latents."""
    flags = {"data.train_cache": train_cache, "data.val_cache": val_cache, "train.run": run,
             "train.epochs": epochs}

    def work():
        from revq_pipe.stages.train import run_train

        run_train(_config(config, set_, flags))

    _fail_cleanly(work)


@app.command("eval")
def evaluate(
    split: str = typer.Option("val", help="Split to evaluate."),
    run: Optional[str] = typer.Option(None, help="Run directory holding tokenizer/ (train.run)."),
    images: Optional[str] = typer.Option(None, help="Images of the split (default data.<split>_images)."),
    vae: Optional[str] = typer.Option(None, help="Local VAE folder or hub id (vae.source)."),
    fid_weights: Optional[str] = typer.Option(None, help="pt_inception-2015-12-05 weights file (or REVQ_FID_WEIGHTS)."),
    lpips_weights: Optional[str] = typer.Option(None, help="LPIPS AlexNet weights (or REVQ_LPIPS_WEIGHTS)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images (eval.limit)."),
    from_cache: bool = typer.Option(False, "--from-cache", help="Latent-level evaluation on the val cache."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Evaluate images -> tokens -> images against the continuous VAE's own ceiling."""
    flags = {"train.run": run, "vae.source": vae, "eval.fid_weights": fid_weights,
             "eval.lpips_weights": lpips_weights, "eval.limit": limit}

    def work():
        from revq_pipe.stages.evaluate import run_evaluate

        cfg = _config(config, set_, flags)
        report = run_evaluate(cfg, run=cfg.train.run, split=split, images=images, from_cache=from_cache)
        if is_main_process():  # under torchrun every rank holds the reduced report
            typer.echo(json.dumps(report, indent=2))

    _fail_cleanly(work)


@app.command()
def tokenize(
    run: Optional[str] = typer.Option(None, help="Run directory holding tokenizer/ (train.run)."),
    split: str = typer.Option("val", help="Split name recorded in the token store."),
    images: Optional[str] = typer.Option(None, help="Tokenize these images through the VAE."),
    cache: Optional[str] = typer.Option(None, help="Tokenize the latents of this cache instead."),
    out: Optional[str] = typer.Option(None, help="Token store to write (tokenize.out)."),
    vae: Optional[str] = typer.Option(None, help="Local VAE folder or hub id (vae.source)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty target store."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Export the token ids of a whole split to Zarr for generative models."""
    if images is not None and cache is not None:
        raise typer.BadParameter("pass either --images or --cache, not both", param_hint="--images/--cache")
    flags = {"train.run": run, "tokenize.out": out, "vae.source": vae}

    def work():
        from revq_pipe.stages.tokenize import run_tokenize

        cfg = _config(config, set_, flags)
        source_images = images
        if images is None and cache is None:
            source_images = getattr(cfg.data, f"{split}_images", None)
            if source_images is None:
                raise ValueError(f"split {split!r} has no configured images; pass --images or --cache")
        store = run_tokenize(cfg, run=cfg.train.run, split=split, images=source_images, cache=cache,
                             out=cfg.tokenize.out.replace("{split}", split), overwrite=overwrite)
        typer.echo(str(store))

    _fail_cleanly(work)


@app.command()
def tolerance(
    run: Optional[str] = typer.Option(None, help="Run directory holding tokenizer/ (train.run)."),
    images: Optional[str] = typer.Option(None, help="Validation images (default data.val_images)."),
    vae: Optional[str] = typer.Option(None, help="Local VAE folder or hub id (vae.source)."),
    fid_weights: Optional[str] = typer.Option(None, help="FID weights, to add rFID to the curve (eval.fid_weights)."),
    lpips_weights: Optional[str] = typer.Option(None, help="LPIPS weights (eval.lpips_weights)."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Measure how much latent noise the frozen decoder tolerates, with the tokenizer on the curve."""
    flags = {"train.run": run, "vae.source": vae, "eval.fid_weights": fid_weights,
             "eval.lpips_weights": lpips_weights}

    def work():
        from revq_pipe.stages.tolerance import run_tolerance

        cfg = _config(config, set_, flags)
        path = run_tolerance(cfg, run=cfg.train.run, images=images or cfg.data.val_images)
        typer.echo(str(path))

    _fail_cleanly(work)


@app.command("import-reference")
def import_reference(
    src: str = typer.Argument(..., help="Folder with a published ReVQ tokenizer's yaml + ckpt.pth, or its hub id "
                                        "(AndyRaoTHU/revq-512T, -256T-B, -256T-L)."),
    out: str = typer.Option(..., help="Folder to write; the tokenizer lands in OUT/tokenizer (then --run OUT)."),
    preprocessor: Optional[str] = typer.Option(None, help="The reference's ckpt/preprocessor.pth "
                                                          "(default SRC/preprocessor.pth)."),
    vae: Optional[str] = typer.Option(None, help="The VAE the tokenizer was trained on (local folder or hub id), "
                                                 "to record its weights hash."),
    overwrite: bool = typer.Option(False, help="Replace the tokenizer of an earlier import in OUT."),
) -> None:
    """Import a tokenizer published with the ReVQ reference code as an ordinary tokenizer folder."""

    def work():
        from revq_pipe.stages.import_reference import run_import_reference

        target = run_import_reference(src, out, preprocessor=preprocessor, vae=vae, overwrite=overwrite)
        typer.echo(str(target))

    _fail_cleanly(work)


@cache_app.command("info")
def cache_info(
    store: str = typer.Argument(..., help="A latent cache (Zarr store)."),
) -> None:
    """Print a cache's manifest and statistics."""

    def work():
        from revq_pipe.cache.reader import cache_info as describe

        typer.echo(json.dumps(describe(store), indent=2, default=str))

    _fail_cleanly(work)


@cache_app.command("import")
def cache_import(
    src: str = typer.Argument(..., help="An (N, C, H, W) tensor in .npy or .pt."),
    out: str = typer.Option(..., help="Zarr store to write."),
    split: str = typer.Option(..., help="Split name recorded in the store."),
    labels: Optional[str] = typer.Option(None, help="Labels (.npy, .pt or one integer per line)."),
    vae: Optional[str] = typer.Option(None, help="Record this VAE's identity (local folder or hub id)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty target store."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Build a latent cache from latents extracted elsewhere, without re-encoding."""

    def work():
        from revq_pipe.cache.importer import import_tensor

        cfg = _config(config, set_, {"vae.source": vae})
        identity = None
        if vae is not None:
            from revq_pipe.pipeline.vae import FrozenVAE

            identity = FrozenVAE.load(cfg.vae.source, device="cpu").identity
        manifest = import_tensor(src, out, split=split, labels_path=labels, vae_identity=identity,
                                 overwrite=overwrite, chunk_size=cfg.encode.chunk_size,
                                 latent_dtype=cfg.encode.latent_dtype)
        typer.echo(f"imported {manifest.num_samples} latents into {out}")

    _fail_cleanly(work)


@demo_app.command("images")
def demo_images(
    out: Optional[str] = typer.Option(None, help="Folder for the demo images (default ROOT/demo/images)."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Write the demo's train and val images (webdataset shards and folders)."""

    def work():
        from revq_pipe.stages.demo import write_demo_images

        cfg = _config(config, set_, {})
        summary = write_demo_images(Path(out or f"{cfg.paths.root}/demo/images"))
        typer.echo(json.dumps(summary, indent=2, default=str))

    _fail_cleanly(work)


@demo_app.command("train-vae")
def demo_train_vae(
    images: Optional[str] = typer.Option(None, help="Demo train image folder (default ROOT/demo/images/train)."),
    out: str = typer.Option("demo/vae", help="Where to save the trained AutoencoderDC."),
    steps: int = typer.Option(1200, help="Optimizer steps (the committed demo VAE used 1200)."),
    config: Optional[Path] = ConfigOption,
    set_: Optional[list[str]] = SetOption,
) -> None:
    """Train the small demo AutoencoderDC that the embedded demo encodes with."""

    def work():
        from revq_pipe.stages.demo import train_demo_vae

        cfg = _config(config, set_, {})
        summary = train_demo_vae(Path(images or f"{cfg.paths.root}/demo/images/train"), Path(out), steps=steps)
        typer.echo(json.dumps(summary, indent=2, default=str))

    _fail_cleanly(work)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
