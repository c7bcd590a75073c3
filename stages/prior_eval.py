"""`revq-pipe prior eval`: how well a trained prior models its tokens, measured with the tools that exist here.

RUN/prior_eval.json:

    val_bits_per_image        the prior's negative log2-likelihood of the val tokens (every row, true class)
    tokenizer_bits_per_image  T log2 K: the same ids without a model
    position_unigram_bits_per_image  the val ids under each position's code frequencies in the train ids
                              (add-one smoothed): the simplest model, the bar a prior has to clear
    cas                       class accuracy (stages/prior_cas.py) of a small CNN trained on the real train
                              images of the token store's source: on the real val images (real_val), on
                              decoded class-conditional samples (samples), on decodes of uniformly random
                              tokens (random_tokens); num_classes and chance beside them
    rfid                      FID of the decoded samples against the real val images (FID Inception weights
                              given), else null with the reason in `missing`

and RUN/prior_eval_grid.png: per class a row of real val images and a row of samples, then random tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revq_pipe.cache.token_store import TokenStore, flat_ids
from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.files import atomic_write_text
from revq_pipe.pipeline.metrics import FidEvaluator, try_load_fid_inception
from revq_pipe.pipeline.precision import job_precision
from revq_pipe.stages.config import RevqConfig
from revq_pipe.stages.console import log
from revq_pipe.stages.distributed import DistContext
from revq_pipe.stages.grid import write_grid
from revq_pipe.stages.prior import TokenRows, load_prior, tokenizer_bits, validation_bits
from revq_pipe.stages.prior_cas import CHANNELS, accuracy, load_images, train_classifier
from revq_pipe.stages.prior_sample import class_label, class_names, decode_ids, decoding_tokenizer, generate_ids
from revq_pipe.stages.run_dir import images_of_cache

REPORT_NAME, GRID_NAME = "prior_eval.json", "prior_eval_grid.png"
GRID_CLASSES, GRID_COLUMNS = 8, 8
RANDOM_TOKENS_SEED_OFFSET = 1  # the random tokens come from their own stream, not the samples'


def run_prior_eval(cfg: RevqConfig, *, run: str, seed: int = 0) -> Path:
    """Write RUN/prior_eval.json and RUN/prior_eval_grid.png; returns the report's path."""
    with job_precision(cfg.prior.precision):
        return _evaluate(cfg, Path(run), seed)


def _evaluate(cfg: RevqConfig, run: Path, seed: int) -> Path:
    pc = cfg.prior
    device = resolve_device(pc.device)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    prior, provenance = load_prior(run, device)
    spec = prior.spec
    train_store, val_store = (TokenStore.open(provenance[k], cfg.storage_options()) for k in ("train_tokens", "val_tokens"))
    seconds: dict[str, float] = {}

    # --- likelihood ---------------------------------------------------------------------------------
    start = time.perf_counter()
    val_bits = validation_bits(prior, TokenRows.of(val_store), pc.batch_size, ctx, pc.precision)
    seconds["val_nll"] = time.perf_counter() - start
    unigram_bits = position_unigram_bits(train_store.ids(), val_store.ids(), spec.codebook_size)
    log(f"val: {val_bits:,.1f} bits/image ({val_bits / spec.num_tokens:.3f}/token) against {tokenizer_bits(spec):,.0f} "
        f"raw bits and {unigram_bits:,.1f} under per-position code frequencies")

    # --- samples and random tokens, decoded ----------------------------------------------------------------
    tokenizer = decoding_tokenizer(cfg, train_store, device)
    per_class, num_classes = pc.eval_samples_per_class, max(spec.num_classes, 1)
    classes = torch.arange(num_classes).repeat_interleave(per_class) if spec.num_classes else \
        torch.full((per_class,), spec.null_class)
    start = time.perf_counter()
    sample_ids = generate_ids(prior, classes, cfg_scale=pc.cfg_scale, temperature=pc.temperature, top_k=pc.top_k,
                              seed=seed, batch_size=pc.batch_size)
    seconds["sampling"] = time.perf_counter() - start
    random_ids = torch.randint(0, spec.codebook_size, sample_ids.shape,
                               generator=torch.Generator().manual_seed(seed + RANDOM_TOKENS_SEED_OFFSET))
    samples, random_images = decode_ids(tokenizer, sample_ids, pc.batch_size), decode_ids(tokenizer, random_ids,
                                                                                        pc.batch_size)
    log(f"sampled {len(classes)} images ({per_class} per class, cfg {pc.cfg_scale:g}) in {seconds['sampling']:.1f} s")

    # --- class accuracy, rFID, grid -----------------------------------------------------------------------
    missing: dict[str, str] = {}
    resolution = tokenizer.resolution
    val_images = _source_images(cfg, val_store, resolution, limit=0, missing=missing)
    cas = _class_accuracy(cfg, spec.num_classes, train_store, val_images, samples, random_images, classes,
                          resolution, device, seconds, missing)
    rfid = _sample_fid(cfg, val_images, samples, device, missing)
    grid = run / GRID_NAME
    _write_grid(grid, val_images, samples, random_images, classes, class_names(train_store))
    report = {"val_bits_per_image": val_bits, "val_bits_per_token": val_bits / spec.num_tokens,
              "tokenizer_bits_per_image": tokenizer_bits(spec), "position_unigram_bits_per_image": unigram_bits,
              "val_rows": val_store.num_samples,
              "cas": cas, "rfid": rfid, "missing": missing, "grid": str(grid),
              "precision": pc.precision,
              "sampling": {"num_samples": len(classes), "per_class": per_class, "cfg_scale": pc.cfg_scale,
                           "temperature": pc.temperature, "top_k": pc.top_k, "seed": seed,
                           "tokens_per_s": len(classes) * spec.num_tokens / seconds["sampling"]},
              "protocol": {"prior_run": str(run.resolve()), "train_tokens": str(train_store.path),
                           "val_tokens": str(val_store.path), "tokenizer": train_store.attrs["tokenizer"],
                           "images": {"train": _store_images(train_store), "val": _store_images(val_store),
                                      "resolution": resolution}},
              "seconds": seconds}
    path = run / REPORT_NAME
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    _print_summary(report, path)
    return path


def position_unigram_bits(train_ids: np.ndarray, val_ids: np.ndarray, codebook_size: int) -> float:
    """Mean bits per val row (rows, T) under per-position code frequencies of the train rows, add-one smoothed."""
    num_tokens = train_ids.shape[1]
    counts = np.bincount(flat_ids(train_ids, codebook_size).ravel().astype(np.int64),
                         minlength=num_tokens * codebook_size).reshape(num_tokens, codebook_size) + 1.0
    log_probs = np.log2(counts / counts.sum(axis=1, keepdims=True))  # (T, K)
    return float(-log_probs[np.arange(num_tokens), val_ids.astype(np.int64)].sum(axis=1).mean())


def _store_images(store: TokenStore) -> str | None:
    """The images a token store's ids came from: its image source, or the source its latent cache records."""
    source = store.attrs["source"]
    if source.get("kind") == "images":
        return source["path"]
    return images_of_cache(source["path"]) if source.get("kind") == "cache" else None


def _source_images(cfg: RevqConfig, store: TokenStore, resolution: int, *, limit: int, missing: dict[str, str]):
    images = _store_images(store)
    if images is None:
        missing["cas"] = f"{store.path} records no source images (imported latents)"
        return None
    return load_images(images, resolution, limit=limit, num_workers=cfg.prior.num_workers,
                       options=cfg.storage_options())


def _class_accuracy(cfg: RevqConfig, num_classes: int, train_store: TokenStore, val_images, samples: torch.Tensor,
                    random_images: torch.Tensor, classes: torch.Tensor, resolution: int, device: torch.device,
                    seconds: dict[str, float], missing: dict[str, str]) -> dict[str, Any] | None:
    """The `cas` block, or None (reason in `missing`) without classes or source images."""
    if num_classes < 2:
        missing["cas"] = f"the prior has {num_classes} classes; class accuracy needs at least 2"
        return None
    train_images = _source_images(cfg, train_store, resolution, limit=cfg.prior.cas_max_train_images, missing=missing)
    if train_images is None or val_images is None:
        return None
    train_images, val_images = train_images.labelled(), val_images.labelled()  # the FID reference keeps them all
    if min(len(train_images.labels), len(val_images.labels)) == 0:
        missing["cas"] = (f"class accuracy needs images with a class: {len(train_images.labels)} train and "
                          f"{len(val_images.labels)} val images of the token stores' sources have one")
        return None
    start = time.perf_counter()
    classifier = train_classifier(train_images, num_classes, epochs=cfg.prior.cas_epochs, seed=cfg.prior.seed,
                                  device=device)
    seconds["classifier"] = time.perf_counter() - start
    return {"real_val": accuracy(classifier, val_images.images, val_images.labels),
            "samples": accuracy(classifier, samples, classes),
            "random_tokens": accuracy(classifier, random_images, classes),
            "num_classes": num_classes, "chance": 1.0 / num_classes,
            "classifier": {"train_images": len(train_images.labels), "val_images": len(val_images.labels),
                           "epochs": cfg.prior.cas_epochs, "seed": cfg.prior.seed,
                           "train_accuracy": accuracy(classifier, train_images.images, train_images.labels),
                           "architecture": f"conv-BN-ReLU-maxpool x {len(CHANNELS)} {list(CHANNELS)}, global "
                                           "average pool, linear; flips and 4 px shifts"}}


def _sample_fid(cfg: RevqConfig, val_images, samples: torch.Tensor, device: torch.device,
                missing: dict[str, str]) -> float | None:
    """FID of the decoded samples against the real val images, or None with the reason."""
    net, reason = try_load_fid_inception(cfg.eval.fid_weights or None, device)
    if net is None or val_images is None:
        missing["rfid"] = reason or "no real val images to compare with"
        return None
    evaluator = FidEvaluator(net, ["samples"], inception_score=False)
    for chunk in val_images.images.split(64):
        evaluator.update_real(chunk.to(device))
    for chunk in samples.split(64):
        evaluator.update_fake(chunk.to(device), "samples")
    result = evaluator.compute("samples")
    if result.fid is None:
        missing["rfid"] = result.missing["rfid"]
    return result.fid


def _write_grid(path: Path, val_images, samples: torch.Tensor, random_images: torch.Tensor, classes: torch.Tensor,
                names: list[str] | None) -> None:
    """Per class (the first GRID_CLASSES): a row of real val images and a row of samples; then random tokens."""
    width = min(GRID_COLUMNS, int(torch.bincount(classes).max()))
    rows, labels = [], []
    for c in torch.unique(classes).tolist()[:GRID_CLASSES]:
        real = val_images.images[val_images.labels == c][:width] if val_images is not None else None
        if real is not None and len(real) == width:
            rows.append(real)
            labels.append(f"{class_label(c, names)}: real val")
        mine = samples[classes == c][:width]
        if len(mine) == width:
            rows.append(mine)
            labels.append(f"{class_label(c, names)}: samples")
    rows.append(random_images[:width])
    labels.append("random tokens")
    write_grid(path, rows, labels)


def _print_summary(report: dict, path: Path) -> None:
    cas = report["cas"]
    text = (f"prior eval: val {report['val_bits_per_image']:,.1f} bits/image vs {report['tokenizer_bits_per_image']:,.0f} "
            f"raw, {report['position_unigram_bits_per_image']:,.1f} per-position frequencies")
    if cas is not None:
        text += (f" | class accuracy: real val {cas['real_val']:.1%}, samples {cas['samples']:.1%}, random tokens "
                 f"{cas['random_tokens']:.1%} (chance {cas['chance']:.1%})")
    text += f" | rFID {'n/a' if report['rfid'] is None else format(report['rfid'], '.2f')}"
    log(text)
    for metric, reason in report["missing"].items():
        log(f"{metric}: null: {reason}")
    log(f"report {path}, grid {report['grid']}")

