"""Image datasets with a deterministic order and random access by index.

`open_image_dataset(path)` accepts:

- an ImageFolder tree: ROOT/<class>/.../<file>.png, class ids = sorted class folder names
  (hidden folders ignored), files sorted by relative path, key = relative path ("cat/001.png");
- a flat folder of images (no class folders): labels -1, key = file name;
- a single .tar shard, a folder holding .tar shards, a glob ("shards/train-*.tar") or a
  webdataset brace pattern ("shards/train-{000000..000003}.tar"): shards in sorted order (brace
  patterns in their expansion order), samples in member order, grouped by webdataset key (the
  member path up to the first dot of its file name). A sample's image is its jpg/jpeg/png/webp
  member, its label the integer in an optional `cls` member (else -1), its key the tar key.
  Samples without an image member (e.g. metadata only) are not inputs; they are listed in `ignored`,
  like the non-image files of a folder, and stages report how many there were.

The same forms work on object storage (s3://, gs://, ... with their fsspec backend): a URL prefix
holding .tar objects, a .tar URL, a glob or a brace pattern are shards; any other prefix is read as an
ImageFolder tree or a flat folder (one listing of the prefix, one GET per image).

Every rank and DataLoader worker reads arbitrary indices, so tar shards are indexed once
(member offsets via `tarfile`) and `read_bytes(i)` seeks straight to the member.
"""

from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, Dataset
from webdataset.tariterators import base_plus_ext

from revq_pipe.cache import storage
from revq_pipe.pipeline.images import ImageDecodeError, decode_image, image_extensions, preprocess

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
TAR_LABEL_EXTENSION = "cls"


class ImageDataset:
    """Encoded images by index: `len`, `key(i)`, `label(i)`, `read_bytes(i)`."""

    def __init__(self, source: str, keys: list[str], labels: np.ndarray, classes: list[str] | None = None,
                 ignored: list[str] | None = None):
        self.source = source
        self.classes = classes  # class folder names of an ImageFolder tree, else None
        self.ignored = ignored or []  # files (or tar samples) that are no image Pillow can open: not inputs
        self._keys = keys
        self._labels = labels  # (N,) int64, -1 when unknown

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, i: int) -> str:
        return self._keys[i]

    def label(self, i: int) -> int:
        return int(self._labels[i])

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError


class FolderImageDataset(ImageDataset):
    """Image files below a root folder or URL prefix."""

    def __init__(self, root: str, relative_paths: list[str], labels: np.ndarray, classes: list[str] | None,
                 ignored: list[str] | None = None, options: dict[str, Any] | None = None):
        super().__init__(root, relative_paths, labels, classes, ignored)
        self.options = options  # fsspec storage options when the root is a URL

    def read_bytes(self, i: int) -> bytes:
        return storage.read_bytes(storage.join(self.source, self._keys[i]), self.options)


class TarImageDataset(ImageDataset):
    """Samples of uncompressed tar shards, read by seeking to the indexed member."""

    def __init__(self, source: str, shards: list[str], keys: list[str], labels: np.ndarray,
                 locations: np.ndarray, ignored: list[str] | None = None, options: dict[str, Any] | None = None):
        super().__init__(source, keys, labels, ignored=ignored)
        self.shards = shards
        self.options = options  # fsspec storage options when the shards are URLs
        self._locations = locations  # (N, 3) int64: shard index, data offset, size

    def read_bytes(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self._locations[i])
        if storage.is_url(self.shards[shard]):  # one ranged GET of the member's bytes
            fs, path = storage.filesystem(self.shards[shard], self.options)
            return fs.cat_file(path, start=offset, end=offset + size)
        with open(self.shards[shard], "rb") as f:  # opened per read: safe in forked workers, cheap next to decoding
            f.seek(offset)
            return f.read(size)


def open_image_dataset(path: str | os.PathLike, options: dict[str, Any] | None = None) -> ImageDataset:
    """Open an ImageFolder tree, a flat image folder, a .tar shard, a folder of shards, a glob or a brace pattern.

    A URL (`options` are its fsspec storage options) takes the same forms: a .tar URL, a glob or a brace
    pattern are shards, a prefix holding .tar objects at its top level is a folder of shards, any other
    prefix an image folder.
    """
    text = str(path)
    if storage.is_url(text):
        if text.endswith(".tar") or any(c in text for c in "{*?["):
            return _open_tar_shards(text, _shard_urls(text, options), options)
        return _open_url_prefix(text, options)
    if "{" in text and "}" in text:
        shards = list(braceexpand(text))
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {text} do not exist "
                                    f"(first: {missing[0]}); fix --images")
        return _open_tar_shards(text, shards)
    if any(c in text for c in "*?["):
        shards = sorted(glob.glob(text))
        if not shards:
            raise FileNotFoundError(f"no file matches the pattern {text}; fix --images")
        return _open_tar_shards(text, shards)
    root = Path(text).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image source {text} does not exist; pass --images with an ImageFolder tree, "
                                "a .tar shard, a folder of shards, a glob or a brace pattern")
    if root.is_file():
        return _open_tar_shards(text, [text])
    shards = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix == ".tar")
    if shards:
        return _open_tar_shards(text, shards)
    return _open_image_folder(root)


def _shard_urls(url: str, options: dict[str, Any] | None) -> list[str]:
    """The .tar objects a URL names: itself, a brace expansion, a glob, or the .tar objects under a prefix."""
    fs, _ = storage.filesystem(url, options)
    scheme = url.split("://", 1)[0]
    if "{" in url and "}" in url:
        shards = list(braceexpand(url))
        missing = [s for s in shards if not fs.exists(storage.filesystem(s, options)[1])]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(shards)} shards of {url} do not exist (first: "
                                    f"{missing[0]}); fix --images")
        return shards
    if any(c in url for c in "*?["):
        shards = sorted(f"{scheme}://{p}" for p in fs.glob(storage.filesystem(url, options)[1]))
        if not shards:
            raise FileNotFoundError(f"no object matches the pattern {url}; fix --images")
        return shards
    if not fs.exists(storage.filesystem(url, options)[1]):
        raise FileNotFoundError(f"the shard {url} does not exist; fix --images")
    return [url]


def _open_url_prefix(url: str, options: dict[str, Any] | None) -> ImageDataset:
    """A prefix: its top-level .tar objects as shards when it has any, else an image folder (one listing)."""
    names = [n for n in storage.list_prefix(url, options) if not _is_hidden(n)]
    if not names:
        raise FileNotFoundError(f"nothing is stored under {url}; pass --images with an image folder, .tar shards, "
                                "a glob or a brace pattern")
    shards = [storage.join(url, n) for n in names if "/" not in n and n.endswith(".tar")]
    if shards:
        return _open_tar_shards(url, shards, options)
    class_dirs = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    return _folder_dataset(url, names, class_dirs, options)


def _open_shard(shard: str, options: dict[str, Any] | None):
    """A binary, seekable file object for a local shard or a shard URL (ranged reads on object storage)."""
    if storage.is_url(shard):
        fs, path = storage.filesystem(shard, options)
        return fs.open(path, "rb")
    return open(shard, "rb")


# --- image folders --------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(image_extensions())


def _is_hidden(relative: str) -> bool:
    """A file in or below a folder whose name starts with a dot (.git, .ipynb_checkpoints, .DS_Store)."""
    return any(part.startswith(".") for part in relative.split("/"))


def _open_image_folder(root: Path) -> FolderImageDataset:
    """A local folder: every visible file below it (symlinked folders followed), and its visible subfolders."""
    files = []
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        rel_dir = Path(directory).relative_to(root).as_posix()
        files += [name if rel_dir == "." else f"{rel_dir}/{name}" for name in names if not name.startswith(".")]
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return _folder_dataset(str(root), files, class_dirs)


def _folder_dataset(root: str, files: list[str], class_dirs: list[str],
                    options: dict[str, Any] | None = None) -> FolderImageDataset:
    """Class subfolders -> ImageFolder labels; no subfolders -> a flat folder with labels -1.

    `files`: every visible file below `root`, relative and "/"-separated; `class_dirs`: its visible
    subfolders. Every file Pillow can open counts (by extension); other files are listed in `ignored`.
    """
    loose = sorted(f for f in files if "/" not in f)
    top_level = [name for name in loose if _is_image(name)]
    ignored = [name for name in loose if not _is_image(name)]
    if class_dirs and top_level:
        raise ValueError(f"{root} holds both image files ({top_level[0]}, ...) and class folders "
                         f"({class_dirs[0]}, ...); move the loose images into a class folder, or point --images "
                         "at a folder of one kind")
    if not class_dirs:
        paths, labels = top_level, [-1] * len(top_level)
    else:
        label_of = {name: label for label, name in enumerate(class_dirs)}
        nested = sorted(f for f in files if "/" in f)
        entries = [(f, label_of[f.split("/", 1)[0]]) for f in nested if _is_image(f)]
        ignored += [f for f in nested if not _is_image(f)]
        paths, labels = [p for p, _ in entries], [label for _, label in entries]
    if not paths:
        raise ValueError(f"{root} holds no images Pillow can open ({len(ignored)} other files, e.g. "
                         f"{ignored[:3]}); point --images at an ImageFolder tree or .tar shards")
    return FolderImageDataset(root, paths, np.asarray(labels, dtype=np.int64), class_dirs or None, sorted(ignored),
                              options)


# --- tar shards -----------------------------------------------------------------------------


def _open_tar_shards(source: str, shards: list[str], options: dict[str, Any] | None = None) -> TarImageDataset:
    keys, labels, locations, ignored = [], [], [], []
    for shard_index, shard in enumerate(shards):
        for key, image, label in _index_shard(shard, options):
            if image is None:
                ignored.append(f"{Path(shard).name}:{key}")
                continue
            keys.append(key)
            labels.append(label)
            locations.append((shard_index, *image))
    if not keys:
        raise ValueError(f"{source} holds no image samples (tar members with an extension Pillow opens, such as "
                         f".{', .'.join(TAR_IMAGE_EXTENSIONS)}); check --images")
    return TarImageDataset(source, shards, keys, np.asarray(labels, dtype=np.int64),
                           np.asarray(locations, dtype=np.int64).reshape(-1, 3), ignored, options)


def _index_shard(shard: str, options: dict[str, Any] | None = None) -> list[tuple[str, tuple[int, int] | None, int]]:
    """(key, (data offset, size) of the image member or None without one, label) per sample, in member order."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        # "r:" = uncompressed only: compressed tars cannot seek
        with _open_shard(shard, options) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:  # consecutive members of one key form a sample
                    samples.append((key, {}))
                samples[-1][1][ext.lower()] = member
            labels = [_read_label(tar, members[TAR_LABEL_EXTENSION], shard, key)
                      if TAR_LABEL_EXTENSION in members else -1 for key, members in samples]
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"cannot read the tar shard {shard} ({error}); "
                         "shards must be uncompressed .tar files") from None
    index = []
    openable = {e.lstrip(".") for e in image_extensions()}
    for (key, members), label in zip(samples, labels):
        preferred = [e for e in TAR_IMAGE_EXTENSIONS if e in members]
        ext = (preferred or sorted(e for e in members if e in openable) or [None])[0]
        index.append((key, None if ext is None else (members[ext].offset_data, members[ext].size), label))
    return index


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, key: str) -> int:
    text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"sample {key!r} of {shard} has a cls member {text[:40]!r} that is not an integer "
                         "class id; fix the shard or drop its cls members") from None


class DecodedImages(Dataset):
    """Decode + preprocess one image per index in a DataLoader worker; unreadable ones come back as None."""

    def __init__(self, images: ImageDataset, resolution: int) -> None:
        self.images = images
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        key = self.images.key(i)
        try:
            img = decode_image(self.images.read_bytes(i), key)
        except ImageDecodeError as error:
            return i, None, error.reason
        except OSError as error:  # a file that vanished or cannot be read
            return i, None, f"{type(error).__name__}: {error}"
        return i, preprocess(img, self.resolution), None


def collate_decoded(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict:
    """Split a batch into decoded images (in index order) and skipped (index, reason) pairs."""
    good = [(i, x) for i, x, _ in items if x is not None]
    return {
        "indices": [i for i, _ in good],
        "images": torch.stack([x for _, x in good]) if good else None,  # (n, 3, R, R)
        "skipped": [(i, reason) for i, x, reason in items if x is None],
    }


# --- decoded batches --------------------------------------------------------------------------

PREFETCH_BATCHES_PER_WORKER = 4  # keeps the accelerator fed while workers decode JPEGs


@dataclass
class ImageBatch:
    images: torch.Tensor | None  # (n, 3, R, R) in [-1, 1], on the device; None if all were unreadable
    indices: list[int]  # dataset indices of the decoded images
    skipped: list[tuple[int, str]]  # (dataset index, reason) of unreadable ones


def image_batches(dataset: ImageDataset, batches: list[list[int]], resolution: int, num_workers: int,
                  device: torch.device) -> Iterator[ImageBatch]:
    """Decode and preprocess the given index batches in DataLoader workers, in order, onto `device`.

    Every stage that reads images (encode, eval, tokenize, tolerance) goes through here, so they all
    see the same pixels for the same file.
    """
    if not batches:
        return
    loader = DataLoader(DecodedImages(dataset, resolution), batch_sampler=batches, collate_fn=collate_decoded,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH_BATCHES_PER_WORKER if num_workers > 0 else None)
    for batch in loader:
        images = batch["images"]
        yield ImageBatch(images=None if images is None else images.to(device, non_blocking=True),
                         indices=batch["indices"], skipped=batch["skipped"])


def contiguous_batches(lo: int, hi: int, batch_size: int) -> list[list[int]]:
    """[lo, hi) cut into consecutive batches of at most batch_size indices."""
    return [list(range(b, min(b + batch_size, hi))) for b in range(lo, hi, batch_size)]


@dataclass
class UnitOutputs:
    """What a function of the images gave for one work unit of a staged writer."""

    unit: int
    outputs: np.ndarray  # (n, ...) one row per readable input, in input order
    labels: np.ndarray  # (n,) int64, -1 when unknown
    keys: list[str]
    skipped: list[tuple[str, str]]  # (key, reason) of unreadable inputs


class _HostCopy:
    """A batch's outputs on their way to host memory: from an accelerator a non-blocking copy into pinned
    memory, waited for only when the unit is complete (no host sync per batch)."""

    def __init__(self, outputs: torch.Tensor | np.ndarray) -> None:
        self._ready = None
        if isinstance(outputs, torch.Tensor) and outputs.is_cuda:
            self._host = torch.empty(outputs.shape, dtype=outputs.dtype, pin_memory=True)
            self._host.copy_(outputs, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = outputs

    def numpy(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.numpy() if isinstance(self._host, torch.Tensor) else np.asarray(self._host)


def map_units(dataset: ImageDataset, writer, units: list[int],
              fn: Callable[[torch.Tensor], torch.Tensor | np.ndarray], *, batch_size: int, resolution: int,
              num_workers: int, device: torch.device, output_shape: tuple[int, ...],
              output_dtype) -> Iterator[UnitOutputs]:
    """Apply `fn` (images (B, 3, R, R) -> tensor or array (B, ...)) to every readable input of `units`, in
    the writer's fixed per-unit batches (writer.unit_batches), and yield each unit once its last batch
    has arrived. One DataLoader feeds all units in order (encode and tokenize share this). Device outputs
    come to the host without a synchronisation per batch (`_HostCopy`)."""
    pending = iter(units)
    unit = next(pending, None)
    outputs, indices, skipped = [], [], []
    for batch in image_batches(dataset, writer.unit_batches(units, batch_size), resolution, num_workers, device):
        if batch.images is not None:
            outputs.append(_HostCopy(fn(batch.images)))
            indices += batch.indices
        skipped += [(dataset.key(i), reason) for i, reason in batch.skipped]
        start, stop = writer.unit_range(unit)
        if len(indices) + len(skipped) == stop - start:  # the unit's last batch has arrived
            yield UnitOutputs(unit=unit,
                              outputs=np.concatenate([o.numpy() for o in outputs]) if outputs
                              else np.zeros((0, *output_shape), output_dtype),
                              labels=np.asarray([dataset.label(i) for i in indices], dtype=np.int64),
                              keys=[dataset.key(i) for i in indices], skipped=skipped)
            outputs, indices, skipped = [], [], []
            unit = next(pending, None)
