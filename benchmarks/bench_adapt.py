"""Adapting a tokenizer to a new domain, side by side with the alternatives, on the embedded demo.

    .venv/bin/python benchmarks/bench_adapt.py [--root DIR] [--set KEY=VALUE ...]

Splits the demo's photographs into two domains (demo/domains.py: six photographs as the source, the two
medical images ihc and retina as the target, 512 train and 128 val images), encodes each split with the
demo VAE, trains a tokenizer on the source (the demo recipe), then on the target's validation images prints,
side by side: the source tokenizer as it is, the source tokenizer adapted to the target's 512 train images
(`revq-pipe adapt`, default recipe; --set adapt.* changes it), and a tokenizer trained from scratch on the
target's train images alone (the demo recipe) -- latent MSE before and after the rectifier, PSNR of the
decoded images, codebook usage on the target, and the seconds each took (train or adapt; encoding not
counted). Everything lands under --root (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from revq_pipe.demo.domains import write_domain_split  # noqa: E402
from revq_pipe.demo.images import write_demo_images  # noqa: E402
from revq_pipe.stages.adapt import run_adapt  # noqa: E402
from revq_pipe.stages.config import load_config  # noqa: E402
from revq_pipe.stages.encode import run_encode  # noqa: E402
from revq_pipe.stages.evaluate import run_evaluate  # noqa: E402
from revq_pipe.stages.train import run_train  # noqa: E402


def quietly(work):
    """Run work() with the stages' console lines captured (the table is what this prints)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return work()


def timed(work) -> tuple[object, float]:
    start = time.perf_counter()
    result = quietly(work)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="where caches and runs go (default: a temporary folder, removed after)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="a setting for adapt")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="revq-adapt-")).resolve()
    try:
        images = root / "images"
        quietly(lambda: write_demo_images(images))
        domains = write_domain_split(images, root / "domains")
        base = [f"paths.root={root}"]
        for domain in domains:
            for split in ("train", "val"):
                quietly(lambda: run_encode(load_config("demo", base), split=split,
                                           images=str(root / "domains" / domain / split),
                                           out=str(root / "cache" / f"{domain}-{split}.zarr"), overwrite=False))

        def cfg(domain: str, run: str, *extra: str):
            return load_config("demo", [*base, f"data.train_cache={root / 'cache' / f'{domain}-train.zarr'}",
                                        f"data.val_cache={root / 'cache' / f'{domain}-val.zarr'}",
                                        f"train.run={root / 'runs' / run}", *extra])

        _, source_s = timed(lambda: run_train(cfg("source", "source")))
        adapted, adapt_s = timed(lambda: run_adapt(cfg("target", "adapted", *args.overrides),
                                                   source=str(root / "runs" / "source" / "tokenizer")))
        _, scratch_s = timed(lambda: run_train(cfg("target", "scratch")))
        adapt_epochs = len((Path(adapted) / "metrics.jsonl").read_text().splitlines())
        _, longer_s = timed(lambda: run_train(cfg("target", "scratch-longer", f"train.epochs={adapt_epochs}")))

        target_val = str(root / "domains" / "target" / "val")
        print(f"demo domains: source {', '.join(domains['source'])} ({len(domains['source']) * 256} train images); "
              f"target {', '.join(domains['target'])} ({len(domains['target']) * 256} train, "
              f"{len(domains['target']) * 64} val images); 64x64, demo VAE, 256 tokens, K=256")
        print(f"adapt settings: {' '.join(args.overrides) or 'defaults'}")
        print("latent MSE is in each tokenizer's own standardized space: comparable between the first two rows "
              "(the adapted tokenizer keeps the source's statistics unless adapt.train names them), not with the "
              "last two (the target's statistics); PSNR and SSIM compare all")
        print(f"\n{'on the target val images':<42} {'PSNR':>7} {'SSIM':>7} {'latent MSE quant':>17} {'rect':>7} "
              f"{'usage':>7} {'seconds':>8}")
        rows = (("source tokenizer, as it is", "source", source_s, " (training on the source)"),
                ("source, adapted to the target", "adapted", adapt_s, f" ({adapt_epochs} epochs)"),
                ("trained on the target alone (demo recipe)", "scratch", scratch_s, " (10 epochs)"),
                ("trained on the target alone, as long", "scratch-longer", longer_s, f" ({adapt_epochs} epochs)"))
        for name, run, seconds, note in rows:
            report = quietly(lambda: run_evaluate(cfg("target", run), run=str(root / "runs" / run), split="val",
                                                  images=target_val, from_cache=False))
            print(f"{name:<42} {report['psnr']:>7.2f} {report['ssim']:>7.4f} {report['latent_mse_quantized']:>17.4f} "
                  f"{report['latent_mse']:>7.4f} {report['codebook_usage']:>7.1%} {seconds:>8.1f}{note}")
        ceiling = report["vae_ceiling"]
        print(f"{'the demo VAE alone (ceiling)':<42} {ceiling['psnr']:>7.2f} {ceiling['ssim']:>7.4f}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
