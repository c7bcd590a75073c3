"""RevqTokenizer: save/load round trip, latents <-> ids, images <-> ids through a tiny VAE, token layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.pipeline.vae import FrozenVAE
from tests.helpers_vae import make_tiny_vae

SHAPE = (32, 8, 8)  # the tiny VAE's latent at 64x64
RECIPE = {"resolution": 64, "resize": "shorter-side bilinear antialias", "crop": "center", "value_range": [-1, 1]}


def tiny_tokenizer(num_tokens: int = 256, codebook_size: int = 8, vae_identity=None, shape=SHAPE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    normalizer = LatentNormalizer(torch.randn(shape, generator=generator),
                                  torch.rand(shape, generator=generator) + 0.5)
    quantizer = MultiGroupQuantizer(shape, num_tokens, codebook_size)
    with torch.no_grad():
        quantizer.codebooks.copy_(torch.randn(quantizer.codebooks.shape, generator=generator))
    spec = RectifierSpec(kind="vit", width=32, depth=1, head_dim=16, residual=True)
    torch.manual_seed(seed)
    rectifier = build_rectifier(spec, shape[0])
    with torch.no_grad():  # a rectifier that is not the identity, so the round trip is a real check
        for p in rectifier.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    identity = vae_identity or {"source": None, "class": None, "weights_sha256": None}
    return RevqTokenizer(normalizer, quantizer, rectifier, rectifier_spec=spec,
                         vae_identity=identity, image_recipe=RECIPE)


def raw_latents(tokenizer: RevqTokenizer, n: int = 4) -> torch.Tensor:
    z = torch.randn(n, *tokenizer.latent_shape, generator=torch.Generator().manual_seed(7))
    return tokenizer.normalizer.denormalize(z)


def test_save_and_load_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["latent_shape"] == [32, 8, 8] and config["num_tokens"] == 256
    assert config["codebook_size"] == 8 and config["token_dim"] == 8
    assert config["rectifier"]["width"] == 32 and config["image"] == RECIPE
    loaded = RevqTokenizer.from_pretrained(tmp_path / "tok", device="cpu")
    assert not loaded.training
    latents = raw_latents(tokenizer)
    ids = tokenizer.latents_to_ids(latents)
    assert ids.shape == (4, 256) and ids.dtype == torch.int64
    assert torch.equal(loaded.latents_to_ids(latents), ids)
    assert torch.equal(loaded.ids_to_latents(ids), tokenizer.ids_to_latents(ids))


def test_quantize_rectify_and_ids_to_latents_agree():
    tokenizer = tiny_tokenizer()
    latents = raw_latents(tokenizer)
    ids, quantized = tokenizer.quantize(latents)
    assert torch.equal(ids, tokenizer.latents_to_ids(latents))
    assert torch.equal(tokenizer.latents_to_ids(quantized), ids), "codes must quantize to themselves"
    torch.testing.assert_close(tokenizer.rectify(quantized), tokenizer.ids_to_latents(ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tokenizer.rectify(quantized), quantized)


def test_bad_inputs_are_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"expected \(B, 256\)"):
        tokenizer.ids_to_latents(torch.zeros(2, 128, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected 0..7"):
        tokenizer.ids_to_latents(torch.full((2, 256), 8))
    with pytest.raises(ValueError, match=r"expects \(B, 32, 8, 8\)"):
        tokenizer.latents_to_ids(torch.zeros(2, 32, 4, 4))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        RevqTokenizer.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unnamed VAE"):
        tokenizer.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_images_round_trip_through_the_vae(tmp_path):
    folder = make_tiny_vae(tmp_path)
    vae = FrozenVAE.load(str(folder), device="cpu")
    tokenizer = tiny_tokenizer(vae_identity=vae.identity)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = RevqTokenizer.from_pretrained(tmp_path / "tok", device="cpu")  # VAE from the recorded source
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ids = loaded.encode(images)
    assert torch.equal(ids, tokenizer.latents_to_ids(vae.encode(images.float() / 127.5 - 1)))
    decoded = loaded.decode(ids)
    assert decoded.shape == (2, 3, 64, 64) and decoded.min() >= -1 and decoded.max() <= 1
    torch.testing.assert_close(decoded, vae.decode(tokenizer.ids_to_latents(ids)).clamp(-1, 1))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 64, 64\)"):
        loaded.encode(torch.zeros(1, 3, 32, 32))

    other = FrozenVAE.load(str(make_tiny_vae(tmp_path, seed=1)), device="cpu")
    with pytest.raises(ValueError, match="VAE mismatch"):
        RevqTokenizer.from_pretrained(tmp_path / "tok", vae=other, device="cpu")


def test_encode_takes_what_users_hold_and_refuses_the_wrong_value_range(tmp_path):
    vae = FrozenVAE.load(str(make_tiny_vae(tmp_path)), device="cpu")
    tokenizer = tiny_tokenizer(vae_identity=vae.identity)
    tokenizer.attach_vae(vae)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    expected = tokenizer.encode(pixels)
    hwc = pixels.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) uint8
    assert torch.equal(tokenizer.encode(hwc), expected)
    assert torch.equal(tokenizer.encode([Image.fromarray(a) for a in hwc]), expected)
    assert torch.equal(tokenizer.encode(Image.fromarray(hwc[0])), expected[:1])
    assert torch.equal(tokenizer.encode(pixels.float() / 127.5 - 1), expected)
    assert torch.equal(tokenizer.encode(pixels[0]), expected[:1])  # one (3, R, R) image
    # a larger PIL image goes through the recipe: shorter side resized, centre crop
    big = Image.fromarray(hwc[0]).resize((128, 96))
    assert tokenizer.encode(big).shape == (1, 256)

    unit = pixels.float() / 255  # torchvision's ToTensor range
    with pytest.raises(ValueError, match=r"\[0, 1\] data.*expects \[-1, 1\]"):
        tokenizer.encode(unit)
    assert torch.equal(tokenizer.encode(unit, value_range=(0, 1)), tokenizer.encode(unit * 2 - 1))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tokenizer.encode(pixels.float())
    with pytest.raises(ValueError, match=r"shape \(2, 64, 64, 3\) and dtype float32; pass uint8"):
        tokenizer.encode(hwc.astype(np.float32))

    # decode takes ids as the token store holds them: numpy, any integer dtype
    ids = expected.numpy().astype(np.uint16)
    torch.testing.assert_close(tokenizer.decode(ids), tokenizer.decode(expected))
    with pytest.raises(ValueError, match="integers"):
        tokenizer.decode(ids.astype(np.float32))


def test_the_package_exports_the_tokenizer():
    from revq_pipe.pipeline import RevqTokenizer as exported

    assert exported is RevqTokenizer


@pytest.mark.parametrize("num_tokens, expected", [
    (256, {"channel": 1, "row": 2, "col_start": 0, "col_stop": 8, "num_rows": 1}),   # d=8: one whole row
    (512, {"channel": 0, "row": 5, "col_start": 4, "col_stop": 8, "num_rows": 1}),   # d=4: half a row
    (128, {"channel": 4, "row": 4, "col_start": 0, "col_stop": 8, "num_rows": 2}),   # d=16: two rows
])
def test_token_layout(num_tokens, expected):
    layout = tiny_tokenizer(num_tokens=num_tokens).token_layout()
    d = 2048 // num_tokens
    assert len(layout) == num_tokens
    assert [(p["flat_start"], p["flat_stop"]) for p in layout] == [(t * d, (t + 1) * d) for t in range(num_tokens)]
    position = {256: 10, 512: 11, 128: 18}[num_tokens]
    assert {k: layout[position][k] for k in expected} == expected
    # the layout agrees with the quantizer's own cut of the latent
    flat = torch.arange(2048.0).view(1, *SHAPE)
    tokens = MultiGroupQuantizer(SHAPE, num_tokens, 2).to_tokens(flat)[0]  # (T, d)
    assert tokens[position, 0].item() == layout[position]["flat_start"]


def test_one_resolver_decides_the_vae_and_the_image_side():
    """Named values win for the VAE; a named image side must be the recorded recipe's (it decides the latents)."""
    tokenizer = tiny_tokenizer(vae_identity={"source": "/models/vae", "class": "AutoencoderDC", "weights_sha256": "a"})
    assert tokenizer.vae_source() == "/models/vae" and tokenizer.vae_source("/other/copy") == "/other/copy"
    assert tokenizer.image_resolution() == tokenizer.resolution == 64 == tokenizer.image_resolution(64)
    with pytest.raises(ValueError, match="data.resolution=48 cannot be honoured: this tokenizer's image recipe is 64 px"):
        tokenizer.image_resolution(48, what="data.resolution")
    unnamed = tiny_tokenizer()  # trained on imported latents: no VAE, and here no recipe either
    unnamed.image_recipe = {}
    with pytest.raises(ValueError, match="records no VAE"):
        unnamed.vae_source()
    assert unnamed.image_resolution(48) == 48
    with pytest.raises(ValueError, match="records no image resolution"):
        unnamed.resolution
