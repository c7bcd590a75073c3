"""Image decoding and the preprocessing recipe."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from revq_pipe.pipeline.images import ImageDecodeError, as_model_batch, decode_image, preprocess, recipe, to_uint8


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 77.0)], axis=2)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


@pytest.mark.parametrize("size", [(64, 64), (100, 80), (80, 100), (33, 200), (20, 20)])
def test_preprocess_shape_and_range(size):
    x = preprocess(gradient(*size), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_preprocess_is_the_identity_at_the_target_size():
    img = gradient(32, 32)
    x = preprocess(img, 32)
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert torch.equal(to_uint8(x[None])[0], torch.from_numpy(np.array(img)).permute(2, 0, 1))


def test_preprocess_resizes_shorter_side_then_crops_the_centre():
    # 40 x 20 image, left half black, right half white; R=10 -> resized to 20 x 10 -> crop columns 5..15
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    x = preprocess(Image.fromarray(pixels), 10)
    row = x[0, 5]
    assert row[0] == -1 and row[-1] == 1  # both halves survive the centre crop
    assert (row[:4] == -1).all() and (row[6:] == 1).all()


def test_preprocess_downscale_is_antialiased():
    # a 1-pixel checkerboard averages to grey when shrunk with an antialiased filter
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    x = preprocess(Image.fromarray(board).convert("RGB"), 16)
    assert x.abs().max() < 0.05


def test_centre_crop_rounds_like_the_reference():
    # width 13 -> (13 - 10) / 2 = 1.5 rounds to 2 (Python round), so columns 2..11 survive
    pixels = np.tile(np.arange(13, dtype=np.uint8)[None, :, None] * 10, (10, 1, 3))
    x = preprocess(Image.fromarray(pixels), 10)
    first_column = round(float((x[0, 0, 0] + 1) * 127.5))
    assert first_column == 20


def test_recipe():
    assert recipe(256) == {"resolution": 256, "resize": "shorter-side bilinear antialias", "crop": "center",
                           "value_range": [-1, 1]}


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 2 * (100.4 / 255) - 1]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255, 100]


# ---- decoding ----------------------------------------------------------------------------------


def test_rgb_jpeg_and_png():
    img = gradient(24, 16)
    assert decode_image(encode(img), "a.png").tobytes() == img.tobytes()
    decoded = decode_image(encode(img, "JPEG", quality=95), "a.jpg")
    assert decoded.mode == "RGB" and decoded.size == (24, 16)


def test_grayscale_and_palette():
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    out = np.asarray(decode_image(encode(grey), "g"))
    assert out.shape == (16, 16, 3) and (out == np.asarray(grey)[..., None]).all()
    palette = gradient(16, 16).quantize(8)
    out = decode_image(encode(palette), "p")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(palette.convert("RGB")))


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 0  # top half fully transparent
    rgba[2:, :, 3] = 255
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA")), "t"))
    assert (out[:2] == 255).all() and (out[2:] == [200, 0, 0]).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert (np.asarray(decode_image(encode(la), "la")) == 255).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    palette.info["transparency"] = 1
    assert (np.asarray(decode_image(encode(palette, transparency=1), "pt")) == 255).all()


def test_cmyk():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    out = np.asarray(decode_image(encode(cmyk, "JPEG", quality=100), "c.jpg"))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].min() > 230 and out[..., 1:].max() < 25


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32), "I")
    else:
        img = Image.frombytes(mode, (4, 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    fmt = "TIFF" if mode != "I;16" else "PNG"
    decoded = decode_image(encode(img, fmt), "deep")
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_empty_truncated_and_garbage_raise_with_the_key():
    with pytest.raises(ImageDecodeError, match="'e.png'.*empty"):
        decode_image(b"", "e.png")
    with pytest.raises(ImageDecodeError, match="garbage.jpg"):
        decode_image(b"this is not an image at all", "garbage.jpg")
    data = encode(gradient(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError, match="cut.jpg.*(?i:truncated)") as info:
        decode_image(data[: len(data) // 2], "cut.jpg")
    assert info.value.key == "cut.jpg" and "truncated" in info.value.reason.lower()
    png = encode(gradient(64, 64))
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_image(png[: len(png) // 2], "cut.png")


def test_decode_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(ImageDecodeError("k", "why")))
    assert (error.key, error.reason, str(error)) == ("k", "why", "cannot decode image 'k': why")


@pytest.mark.parametrize("mode, array", [
    ("L", np.arange(40 * 50, dtype=np.uint8).reshape(40, 50)),
    ("RGBA", np.arange(40 * 50 * 4, dtype=np.uint8).reshape(40, 50, 4)),
    ("I;16", (np.arange(40 * 50).reshape(40, 50) * 31).astype(np.uint16)),
    ("RGB", np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3)),
])
def test_numpy_images_are_read_as_pillow_reads_the_same_pixels(mode, array):
    """The same content is treated the same way: a numpy array and the PIL image of its pixels give one batch."""
    expected = as_model_batch(Image.fromarray(array), 32)
    assert Image.fromarray(array).mode == mode
    assert torch.equal(as_model_batch(array, 32), expected)
    if array.ndim == 2:
        assert torch.equal(as_model_batch(array[..., None], 32), expected)  # (H, W, 1)
    batch = np.stack([array, array]) if array.ndim == 3 else np.stack([array, array])[..., None]  # (B, H, W, C)
    assert torch.equal(as_model_batch(batch, 32), torch.cat([expected, expected]))


@pytest.mark.parametrize("array", [np.zeros((200, 48, 3), np.float32), np.zeros((2, 48, 64), np.uint8),
                                   np.zeros((40, 50, 3), np.uint16)])
def test_numpy_images_that_are_refused_name_the_shape_passed(array):
    with pytest.raises(ValueError, match=rf"shape \({', '.join(map(str, array.shape))}\) and dtype {array.dtype}"):
        as_model_batch(array, 32)
