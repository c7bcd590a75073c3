"""The demo's image set: deterministic 64x64 train/val crops of the photographs in scikit-image.

The machines that build this project have no network, so the embedded demo cuts its images from
the colour photographs that ship with scikit-image: train crops from the top 75% of each
photograph's rows, val crops from the bottom 25%. `revq-pipe demo images` calls
`write_demo_images`; the demo VAE (demo/vae_training.py) trains on its output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from revq_pipe.pipeline.files import atomic_directory
from revq_pipe.stages.console import log

# The colour photographs in skimage's data folder (no download needed). Synthetic images
# (color.png, chessboard_RGB.png, phantom.png) and the near-duplicate motorcycle_right.png are
# left out. Sorted, so label = index = the class's position among the sorted folder names.
DEMO_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
    "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
)
IMAGE_SIZE = 64
TRAIN_FRACTION = 0.75  # rows above this line of a photograph give train crops, rows below give val crops
SPLITS = ("train", "val")
SHARDS_PER_SPLIT = 4
IMAGES_FORMAT = "revq-demo-images"
IMAGES_FORMAT_VERSION = 1
PNG_OPTIONS = {"format": "PNG", "compress_level": 6, "optimize": False}  # fixed: same bytes every run


def skimage_data_dir() -> Path:
    """scikit-image's bundled data folder, located without importing (or downloading) anything."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the demo images are cut from photographs shipped with scikit-image, which is not installed; "
            "install it with `pip install 'revq-pipe[demo]'` (or `pip install scikit-image`)")
    return Path(spec.origin).parent / "data"


def load_demo_photos() -> dict[str, Image.Image]:
    """{class name: RGB photograph} for DEMO_PHOTOS, in label order."""
    data_dir = skimage_data_dir()
    photos = {}
    for file_name in DEMO_PHOTOS:
        path = data_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"demo photograph {path} is missing from this scikit-image install; "
                                    "reinstall scikit-image (its wheel ships these files)")
        with Image.open(path) as img:
            photos[Path(file_name).stem] = img.convert("RGB")
    return photos


def split_rows(height: int, split: str) -> tuple[int, int]:
    """Row range [top, bottom) of a photograph that `split` may crop from; train and val never overlap."""
    border = int(height * TRAIN_FRACTION)
    return (0, border) if split == "train" else (border, height)


def sample_crop_boxes(size: tuple[int, int], split: str, count: int, *, seed: int, label: int) -> list[list[int]]:
    """`count` random square boxes [left, top, right, bottom] inside the split's rows of a photo.

    Side s is uniform in [IMAGE_SIZE, min(photo dims)//2], capped by the split's region, so every
    crop lies wholly inside its region. The generator depends on (seed, label, split) only, so the
    first n boxes do not change when `count` grows.
    """
    width, height = size
    top, bottom = split_rows(height, split)
    max_side = min(min(width, height) // 2, bottom - top, width)
    if max_side < IMAGE_SIZE:
        raise ValueError(f"photograph {label} ({width}x{height}) has a {split} region too small for "
                         f"{IMAGE_SIZE}px crops")
    rng = np.random.default_rng([seed, label, SPLITS.index(split)])
    boxes = []
    for _ in range(count):
        side = int(rng.integers(IMAGE_SIZE, max_side + 1))
        left = int(rng.integers(0, width - side + 1))
        y = int(rng.integers(top, bottom - side + 1))
        boxes.append([left, y, left + side, y + side])
    return boxes


def encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, **PNG_OPTIONS)
    return buffer.getvalue()


def tree_sha256(root: Path, relative_paths: list[str]) -> str:
    """One hash over the names and bytes of the given files, in sorted order."""
    digest = hashlib.sha256()
    for rel in sorted(relative_paths):
        digest.update(rel.encode() + b"\0")
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()


def demo_images_summary(out_dir: Path, manifest: dict, reused: bool) -> dict:
    return {
        "out_dir": str(out_dir),
        "train_shards": str(out_dir / "shards" / "train-*.tar"),
        "val_shards": str(out_dir / "shards" / "val-*.tar"),
        "train_folder": str(out_dir / "train"),
        "val_folder": str(out_dir / "val"),
        "num_train": manifest["counts"]["train"],
        "num_val": manifest["counts"]["val"],
        "classes": manifest["classes"],
        "manifest": str(out_dir / "manifest.json"),
        "reused": reused,
    }


def existing_demo_images(out_dir: Path, request: dict) -> dict | None:
    """The manifest of a complete, unmodified earlier run with the same request, else None."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if any(manifest.get(k) != v for k, v in request.items()):
        return None
    files = manifest.get("files", [])
    if not all((out_dir / rel).is_file() for rel in files):
        return None
    return manifest if tree_sha256(out_dir, files) == manifest.get("sha256") else None


def write_split(root: Path, split: str, samples: list[tuple[str, str, int, bytes]], num_shards: int) -> list[str]:
    """Write one split as webdataset shards and as an ImageFolder tree; return relative file paths."""
    import webdataset as wds

    written = []
    for key, class_name, _, png in samples:
        rel = f"{split}/{class_name}/{key}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png)
        written.append(rel)
    (root / "shards").mkdir(exist_ok=True)
    per_shard = math.ceil(len(samples) / num_shards)
    for shard in range(num_shards):
        rel = f"shards/{split}-{shard:06d}.tar"
        # mtime fixed and encoder off (we hand over bytes): identical tar bytes on every run.
        with wds.TarWriter(str(root / rel), encoder=False, mtime=0) as sink:
            for key, _, label, png in samples[shard * per_shard:(shard + 1) * per_shard]:
                sink.write({"__key__": key, "png": png, "cls": str(label).encode()})
        written.append(rel)
    return written


def write_demo_images(out_dir: Path, *, seed: int = 0, train_per_photo: int = 256,
                      val_per_photo: int = 64) -> dict:
    """Write the demo's deterministic 64x64 RGB train/val crops; skip if already there.

    Args:
        out_dir: target folder. Gets `shards/{train,val}-00000k.tar` (webdataset: `<key>.png`,
            `<key>.cls` = the label as text), ImageFolder trees `train/<photo>/<key>.png` and
            `val/<photo>/<key>.png` (the same PNG bytes), and `manifest.json` (request, crop
            boxes, file list and a sha256 over all files), written last.
        seed: crop positions and sizes, and the sample order inside the shards.
        train_per_photo, val_per_photo: crops per photograph and split (8 photographs).

    Train crops come from the top 75% of each photograph's rows and val crops from the bottom
    25%, so no val pixel is ever seen in training. Keys are `<photo>_<index:05d>`; label = the
    photograph's index in DEMO_PHOTOS (= sorted class folder order). Same seed -> same bytes
    (on the same Pillow/zlib build; JPEG decoding may differ between libjpeg versions).
    Returns a dict of paths (shard globs, folders, manifest) and counts.
    """
    out_dir = Path(out_dir)
    if train_per_photo < 1 or val_per_photo < 1:
        raise ValueError(f"train_per_photo={train_per_photo} and val_per_photo={val_per_photo} must be >= 1")
    per_photo = {"train": train_per_photo, "val": val_per_photo}
    request = {"format": IMAGES_FORMAT, "format_version": IMAGES_FORMAT_VERSION, "seed": seed,
               "image_size": IMAGE_SIZE, "per_photo": per_photo}
    manifest = existing_demo_images(out_dir, request)
    if manifest is not None:
        log(f"demo images: {out_dir} is up to date ({manifest['counts']}), nothing to do")
        return demo_images_summary(out_dir, manifest, reused=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no demo manifest.json; "
                              "pass an empty or new folder, or delete it")

    # --- cut the crops ------------------------------------------------------------------------
    photos = load_demo_photos()
    classes = list(photos)
    crops: dict[str, dict[str, list[int]]] = {}
    samples: dict[str, list[tuple[str, str, int, bytes]]] = {}
    for split in SPLITS:
        crops[split], samples[split] = {}, []
        for label, (name, photo) in enumerate(photos.items()):
            boxes = sample_crop_boxes(photo.size, split, per_photo[split], seed=seed, label=label)
            for index, box in enumerate(boxes):
                key = f"{name}_{index:05d}"
                crop = photo.crop(tuple(box)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                crops[split][key] = box
                samples[split].append((key, name, label, encode_png(crop)))
        # Mix the photographs across shards so any one shard holds every class.
        order = np.random.default_rng([seed, len(SPLITS) + SPLITS.index(split)]).permutation(len(samples[split]))
        samples[split] = [samples[split][i] for i in order]

    # --- write into a temporary folder that replaces out_dir whole (never a half-written set) ---
    with atomic_directory(out_dir) as tmp:  # out_dir is empty, absent, or an earlier set with another request
        files = []
        for split in SPLITS:
            files += write_split(tmp, split, samples[split], min(SHARDS_PER_SPLIT, len(samples[split])))
        manifest = {
            **request,
            "source": "scikit-image data folder",
            "photos": {name: {"file": f, "label": i, "size": list(photos[name].size)}
                       for i, (name, f) in enumerate(zip(classes, DEMO_PHOTOS))},
            "classes": classes,
            "train_rows_fraction": TRAIN_FRACTION,
            "resize": "Pillow bilinear (antialiased) from a square crop of side in [64, min(photo dims)//2]",
            "counts": {split: len(samples[split]) for split in SPLITS},
            "crop_boxes": crops,  # {split: {key: [left, top, right, bottom]}} in photo pixels
            "files": sorted(files),
            "sha256": tree_sha256(tmp, files),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # last
    log(f"demo images: wrote {manifest['counts']} crops of {len(classes)} photographs to {out_dir}")
    return demo_images_summary(out_dir, manifest, reused=False)
