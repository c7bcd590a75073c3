"""Image decoding and the preprocessing recipe every stage shares.

The recipe follows the reference evaluation protocol: shorter side resized to R with an
antialiased bilinear filter, centre crop R x R, values scaled to [-1, 1]. Decoding turns every
Pillow mode into 8-bit RGB: transparent images are composited on white, 16-bit images are
scaled (not clipped) to 8 bits. EXIF orientation is not applied, like the reference loader.
"""

from __future__ import annotations

import functools
import io
import re
from typing import Any

import numpy as np
import torch
from PIL import Image



@functools.lru_cache(maxsize=1)
def image_extensions() -> tuple[str, ...]:
    """Every file extension Pillow can open here (lower case, with the dot): .jpg, .png, .gif, .webp, ..."""
    Image.init()  # registers all of Pillow's format plugins
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I" is read as 16-bit data, as 16-bit PNGs were
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageDecodeError(ValueError):
    """An input that cannot be decoded into an image; names the sample key and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"cannot decode image {key!r}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self):  # keep it picklable across DataLoader workers
        return type(self), (self.key, self.reason)


def decode_image(data: bytes, key: str) -> Image.Image:
    """Decode encoded image bytes into an 8-bit RGB Pillow image.

    Args:
        data: the file's bytes (JPEG, PNG, WebP, ...).
        key: the sample key, used in the error message.

    Raises:
        ImageDecodeError: empty, truncated or not an image.
    """
    if not data:
        raise ImageDecodeError(key, "empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so a truncated file fails here and not later in a worker
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        # Pillow's messages can name the in-memory buffer's address; drop it so records are reproducible
        message = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error))
        raise ImageDecodeError(key, f"{type(error).__name__}: {message}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float64)  # (H, W); I;16B arrives big-endian and is converted here
        eight_bit = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255 exactly
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def preprocess(img: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side -> R (bilinear, antialiased), centre crop R x R, to float32 (3, R, R) in [-1, 1]."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)  # truncation, as the reference resize computes it
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    if size != img.size:
        # Pillow's BILINEAR widens its kernel when downscaling, i.e. it is antialiased
        img = img.resize(size, Image.BILINEAR, reducing_gap=None)
    top = int(round((size[1] - resolution) / 2.0))
    left = int(round((size[0] - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (R, R, 3)
    unit = pixels.permute(2, 0, 1).to(torch.float32) / 255.0  # (3, R, R) in [0, 1]
    return (unit - 0.5) / 0.5


def recipe(resolution: int) -> dict:
    """The preprocessing recipe recorded in every cache and evaluation report."""
    return {
        "resolution": int(resolution),
        "resize": "shorter-side bilinear antialias",
        "crop": "center",
        "value_range": [-1, 1],
    }


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) floats in [-1, 1] -> uint8 on the 8-bit grid (clamped), as every metric sees them."""
    unit = ((images.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return torch.round(unit * 255.0).to(torch.uint8)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, R, R) on the 8-bit grid -> float32 in [-1, 1] (the inverse of to_uint8 on that grid)."""
    return images.to(torch.float32) / 127.5 - 1.0


def as_model_batch(images: Any, resolution: int, value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """What users hold -> a float32 batch (B, 3, R, R) in [-1, 1], as the VAE expects.

    Accepts a PIL image (any mode), a numpy array holding what a PIL image holds (uint8 (H, W, 3) RGB,
    (H, W, 4) RGBA, (H, W) or (H, W, 1) grey, uint16 (H, W) grey) or a batch of them (B, H, W, C), a list
    of these (each goes through `preprocess`, the recipe's resize and centre crop), or a tensor
    (B, 3, R, R) / (3, R, R) that is already at the resolution: uint8 (0..255) or float in [-1, 1]. A numpy
    array is read exactly as Pillow reads the same pixels from a file, so both give the same batch.

    Float tensors are checked, because a [0, 1] tensor (torchvision's ToTensor) or a [0, 255] one
    would silently give wrong ids: values outside [-1, 1] are refused, and so is a batch with no
    negative value at all, the signature of [0, 1] data. `value_range=(0, 1)` (or (0, 255)) converts
    such data instead; `value_range=(-1, 1)` skips the second check for a batch that really has no
    dark pixel.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images; pass at least one")
        return torch.stack([as_model_batch(image, resolution, value_range)[0] for image in images])
    if isinstance(images, Image.Image):
        return preprocess(_to_rgb(images), resolution)[None]
    if isinstance(images, np.ndarray):
        return torch.stack([preprocess(image, resolution) for image in _numpy_images(images)])
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"cannot make images out of a {type(images).__name__}; pass PIL images, HWC uint8 numpy "
                        "arrays, or tensors (B, 3, R, R)")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (resolution, resolution):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (B, 3, {resolution}, {resolution}). "
                         "Pass PIL images or HWC numpy arrays to have them resized and centre-cropped "
                         f"(pipeline.images.preprocess), or resize them to {resolution}x{resolution} first")
    if images.dtype == torch.uint8:
        return to_model_range(images)
    if not images.is_floating_point():
        raise ValueError(f"images have dtype {images.dtype}; pass uint8 (0..255) or float in [-1, 1]")
    return _float_to_model_range(images.float(), value_range)


_NUMPY_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: the channel counts of an HWC image


def _numpy_images(array: np.ndarray) -> list[Image.Image]:
    """One image (H, W) / (H, W, C) or a batch (B, H, W, C) with C in 1, 3, 4 -> 8-bit RGB PIL images, the
    content Pillow would read from a file of those pixels; anything else is refused with the shape passed."""
    single = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in _NUMPY_CHANNELS)
    batch = array.ndim == 4 and array.shape[-1] in _NUMPY_CHANNELS
    grey = array.ndim == 2 or array.shape[-1] == 1
    if not (single or batch) or not (array.dtype == np.uint8 or (array.dtype == np.uint16 and grey)):
        hint = (" (float data in [0, 1]: (array * 255).round().astype(np.uint8))"
                if np.issubdtype(array.dtype, np.floating) else "")
        raise ValueError(f"numpy images have shape {array.shape} and dtype {array.dtype}; pass uint8 arrays (H, W, 3) "
                         f"RGB, (H, W, 4) RGBA or (H, W) grey (uint16 too), or a batch (B, H, W, C) of them{hint}")
    return [_to_rgb(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image))
            for image in ([array] if single else array)]


def _float_to_model_range(images: torch.Tensor, value_range: tuple[float, float] | None) -> torch.Tensor:
    low, high = float(images.min()), float(images.max())
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if hi <= lo or low < lo - 1e-3 * (hi - lo) or high > hi + 1e-3 * (hi - lo):
            raise ValueError(f"images range over [{low:.4g}, {high:.4g}], outside the stated value_range "
                             f"{tuple(value_range)}")
        return ((images - lo) / (hi - lo) * 2.0 - 1.0).clamp(-1.0, 1.0)
    if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
        hint = "[0, 255]: pass uint8 tensors, or value_range=(0, 255)" if high > 1.5 else "another range"
        raise ValueError(f"float images range over [{low:.4g}, {high:.4g}]; the VAE expects [-1, 1]. They look "
                         f"like {hint}; or convert them with images / 127.5 - 1")
    if low >= 0.0:
        raise ValueError(f"float images range over [{low:.4g}, {high:.4g}] with no negative value: that is [0, 1] "
                         "data (e.g. torchvision's ToTensor), but the VAE expects [-1, 1]. Pass images * 2 - 1, "
                         "or value_range=(0, 1); if they really are [-1, 1] images without a dark pixel, pass "
                         "value_range=(-1, 1)")
    return images.clamp(-1.0, 1.0)
