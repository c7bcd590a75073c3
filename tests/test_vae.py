"""FrozenVAE with tiny random AutoencoderDC / AutoencoderKL models saved in-process."""

import json

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL

from revq_pipe.pipeline.vae import FrozenVAE
from tests.helpers_vae import make_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


def images(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_load_is_frozen_and_identified(vae_dir):
    vae = FrozenVAE.load(str(vae_dir), device="cpu")
    assert not vae.model.training
    assert not any(p.requires_grad for p in vae.model.parameters())
    identity = vae.identity
    assert identity["source"] == str(vae_dir) and identity["class"] == "AutoencoderDC"
    assert len(identity["weights_sha256"]) == 64
    assert FrozenVAE.load(str(vae_dir), device="cpu").identity == identity  # deterministic
    other = FrozenVAE.load(str(make_tiny_vae(vae_dir.parent, seed=1)), device="cpu")
    assert other.identity["weights_sha256"] != identity["weights_sha256"]


def test_latent_shape(vae_dir):
    vae = FrozenVAE.load(str(vae_dir), device="cpu")
    assert vae.latent_shape(64) == (32, 8, 8)
    assert vae.latent_shape(32) == (32, 4, 4)
    with pytest.raises(ValueError, match=r"resolution 60 .*multiple of 8.*--resolution 64"):
        vae.latent_shape(60)
    with pytest.raises(ValueError, match="resolution 0"):
        vae.latent_shape(0)


def test_encode_matches_diffusers_and_decodes(vae_dir):
    vae = FrozenVAE.load(str(vae_dir), device="cpu")
    x = images()
    z = vae.encode(x)
    assert z.shape == (2, 32, 8, 8) and z.dtype == torch.float32 and not z.requires_grad
    with torch.no_grad():
        reference = AutoencoderDC.from_pretrained(vae_dir).eval().encode(x).latent
    torch.testing.assert_close(z, reference, rtol=0, atol=0)  # no scaling factor, nothing else
    y = vae.decode(z)
    assert y.shape == (2, 3, 64, 64) and y.dtype == torch.float32


def test_autoencoder_kl_uses_the_posterior_mode(tmp_path):
    folder = make_tiny_vae(tmp_path, latent_channels=4, kind="kl")
    vae = FrozenVAE.load(str(folder), device="cpu")
    assert vae.identity["class"] == "AutoencoderKL" and vae.latent_shape(64) == (4, 8, 8)
    x = images(seed=1)
    with torch.no_grad():
        reference = AutoencoderKL.from_pretrained(folder).eval().encode(x).latent_dist.mode()
    torch.testing.assert_close(vae.encode(x), reference, rtol=0, atol=0)
    assert vae.decode(vae.encode(x)).shape == (2, 3, 64, 64)


def test_pipeline_folder_with_a_vae_subfolder(vae_dir, tmp_path):
    pipeline_dir = tmp_path / "pipe"
    AutoencoderDC.from_pretrained(vae_dir).save_pretrained(pipeline_dir / "vae")
    vae = FrozenVAE.load(str(pipeline_dir), device="cpu")
    assert vae.identity["weights_sha256"] == FrozenVAE.load(str(vae_dir), device="cpu").identity["weights_sha256"]


def test_missing_and_unloadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_vae.*huggingface-cli download"):
        FrozenVAE.load(str(tmp_path / "missing_vae"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no config.json"):
        FrozenVAE.load(str(tmp_path / "empty"), device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderDC", "latent_channels": 4}))
    with pytest.raises(ValueError, match="broken.*download it again"):
        FrozenVAE.load(str(broken), device="cpu")
    (broken / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        FrozenVAE.load(str(broken), device="cpu")


def test_a_local_source_is_recorded_as_an_absolute_path(vae_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(vae_dir.parent)
    vae = FrozenVAE.load(vae_dir.name, device="cpu")
    assert vae.source == str(vae_dir.resolve()) and vae.identity["source"] == str(vae_dir.resolve())


def test_a_missing_local_looking_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in ("./models/vae", "models/dc-ae/vae", str(tmp_path / "vae")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            FrozenVAE.load(source, device="cpu")


def test_a_hub_id_without_network_fails_fast_and_names_the_network(tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no network connection"):
        FrozenVAE.load("some-org/some-vae", device="cpu")
    assert time.perf_counter() - start < 10
