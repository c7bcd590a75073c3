"""`revq-pipe import-reference`: a tokenizer published with the ReVQ reference code computes the reference's function.

The reference side is re-implemented here from a reading of github.com/Neur-IO/ReVQ (xvq/dataset.py Preprocessor,
xvq/models/__init__.py Viewer, xvq/models/quantizer.py Quantizer, xvq/models/dcae.py DCAEDecoder), with its module
names, so that `state_dict()` gives the reference's key layout, and its file format (torch.save of
{"quantizer", "decoder", ...}, a yaml with the reference's keys, a preprocessor of flat (C*H*W,) vectors). The
values are random; the geometries are the published ones at a small K and a small rectifier.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock
from diffusers.models.normalization import RMSNorm
from torch import nn
from typer.testing import CliRunner

from revq_pipe.cache.reader import LatentCache
from revq_pipe.cache.token_store import TokenStore
from revq_pipe.pipeline.images import recipe
from revq_pipe.pipeline.reference_import import (PREPROCESSOR_URL, REFERENCE_VAE, ReferenceFormatError,
                                                 find_reference_files, import_reference, rectifier_key)
from revq_pipe.pipeline.tokenizer import RevqTokenizer
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages import import_reference as stage
from revq_pipe.stages.cli import app
from revq_pipe.stages.import_reference import run_import_reference
from tests.helpers_eval import RESOLUTION, make_eval_setup

runner = CliRunner()


# --- the reference, re-implemented from reading its code --------------------------------------


class ReferenceDecoder(nn.Module):
    """DCAEDecoder as the published yamls configure it: one stage of EfficientViT blocks at latent resolution."""

    def __init__(self, channels: int, width: int, depth: int, head_dim: int) -> None:
        super().__init__()
        self.in_shortcut_repeats = width // channels
        self.conv_in = nn.Conv2d(channels, width, 3, 1, 1)
        blocks = [EfficientViTBlock(width, attention_head_dim=head_dim, norm_type="rms_norm", qkv_multiscales=[5])
                  for _ in range(depth)]
        self.up_blocks = nn.ModuleList([nn.Sequential(*blocks)])
        self.norm_out = RMSNorm(width, 1e-5, elementwise_affine=True, bias=True)
        self.conv_act = nn.ReLU()
        self.conv_out = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + x.repeat_interleave(self.in_shortcut_repeats, dim=1)
        for up_block in reversed(self.up_blocks):
            h = up_block(h)
        h = self.norm_out(h.movedim(1, -1)).movedim(-1, 1)  # RMSNorm over channels
        return self.conv_out(self.conv_act(h))


@dataclass
class Geometry:
    shape: tuple[int, int, int]  # (C, H, W)
    tokens: int  # T = tokens_per_data = num_group
    codes: int  # K = num_code
    width: int
    depth: int
    head_dim: int = 32

    @property
    def token_dim(self) -> int:
        return int(np.prod(self.shape)) // self.tokens


@dataclass
class Reference:
    """What the reference loads from the three files."""

    folder: Path
    geometry: Geometry
    embeddings: torch.Tensor  # (G, K, d)
    decoder: ReferenceDecoder
    mean: torch.Tensor  # (C*H*W,)
    std: torch.Tensor

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw latents (B, C, H, W) -> (ids (B, T), rectified raw latents): eval.py's vq_infer."""
        b, (c, h, w), d = latents.shape[0], self.geometry.shape, self.geometry.token_dim
        groups, codes = self.embeddings.shape[:2]
        z = ((latents.reshape(b, -1) - self.mean) / self.std).view(b, c, h, w)  # Preprocessor
        x = z.view(b, -1, d).view(-1, groups, d).permute(1, 0, 2)  # Viewer.shuffle, then (G, B, d)
        ids = torch.cdist(x, self.embeddings).min(dim=-1).indices.permute(1, 0)  # (B, G): nearest code per group
        offset = torch.arange(groups) * codes  # index_offset
        quant = self.embeddings.view(-1, d)[(ids + offset).flatten()].reshape(b, -1, d).view(b, c, h, w)
        rec = self.decoder(quant)
        return ids.reshape(b, -1), (rec.reshape(b, -1) * self.std + self.mean).view(b, c, h, w)  # .inverse


def reference_yaml(geometry: Geometry, name: str) -> dict:
    """A config with the reference yaml's layout (512T_NC=16384.yaml), interpolations included."""
    return {
        "workspace": "/data/revq", "name": name, "log_path": "${workspace}/outputs/${name}", "world_size": 1,
        "seed": 42,
        "data": {"train_data_path": "/data/train", "val_data_path": "/data/val", "batch_size": 256,
                 "world_size": "${world_size}"},
        "model": {
            "vae_path": "${workspace}/ckpt/dc_ae", "log_path": "${log_path}", "input_data_size": list(geometry.shape),
            "quantizer": {"TYPE": "vq", "num_code": geometry.codes, "num_group": geometry.tokens,
                          "tokens_per_data": geometry.tokens},
            "decoder": {"TYPE": "dc_ae", "in_channels": geometry.shape[0], "latent_channels": geometry.shape[0],
                        "attention_head_dim": geometry.head_dim, "block_type": ["EfficientViTBlock"],
                        "block_out_channels": [geometry.width], "layers_per_block": [geometry.depth],
                        "qkv_multiscales": [[5]], "norm_type": "rms_norm", "act_fn": "silu",
                        "upsample_block_type": "interpolate"},
        },
        "train": {"log_path": "${log_path}", "batch_size": "${data.batch_size}", "num_epochs": 100, "lr": 0.01},
    }


def write_reference(folder: Path, geometry: Geometry, *, seed: int = 0, mean: torch.Tensor | None = None,
                    std: torch.Tensor | None = None, edit_yaml=None) -> Reference:
    """Write <name>.yaml, ckpt.pth and preprocessor.pth as the reference saves them; random values."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    size = int(np.prod(geometry.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = ReferenceDecoder(geometry.shape[0], geometry.width, geometry.depth, geometry.head_dim)
    with torch.no_grad():  # move the norms and biases off their initial ones and zeros
        for p in decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    embeddings = torch.randn(geometry.tokens, geometry.codes, geometry.token_dim, generator=generator)
    quantizer = OrderedDict(index_offset=torch.arange(geometry.tokens) * geometry.codes,
                            count=torch.randint(0, 3, (geometry.tokens, geometry.codes), generator=generator).float(),
                            embeddings=embeddings)
    torch.save({"quantizer": quantizer, "decoder": decoder.state_dict(), "epoch": 99}, folder / "ckpt.pth")
    mean = torch.randn(size, generator=generator) * 0.5 if mean is None else mean.reshape(-1).float()
    std = torch.rand(size, generator=generator) * 2 + 1.5 if std is None else std.reshape(-1).float()
    torch.save(OrderedDict(mean=mean, std=std), folder / "preprocessor.pth")
    name = f"{geometry.tokens}T_NC={geometry.codes}"
    config = reference_yaml(geometry, name)
    if edit_yaml is not None:
        edit_yaml(config)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Reference(folder, geometry, embeddings, decoder.eval(), mean, std)


GEOMETRIES = {
    "512T": Geometry(shape=(32, 8, 8), tokens=512, codes=16, width=64, depth=2),  # d = 4
    "256T": Geometry(shape=(32, 8, 8), tokens=256, codes=16, width=96, depth=1),  # d = 8
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- equivalence -------------------------------------------------------------------------------


def test_the_key_layout_maps_onto_the_rectifier():
    keys = ReferenceDecoder(32, 64, 2, 32).state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"conv_in", "up_blocks", "norm_out", "conv_out"}
    assert "up_blocks.0.1.attn.to_qkv_multiscale.0.proj_in.weight" in keys
    assert rectifier_key("up_blocks.0.1.attn.to_q.weight") == "blocks.1.attn.to_q.weight"
    assert rectifier_key("conv_in.weight") == "conv_in.weight" and rectifier_key("norm_out.bias") == "norm_out.bias"
    assert rectifier_key("up_blocks.1.0.conv.weight") is None  # a second (upsampling) stage has no counterpart


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_imported_tokenizer_computes_the_reference_forward(name, tmp_path):
    geometry = GEOMETRIES[name]
    reference = write_reference(tmp_path / "published", geometry)
    target = run_import_reference(str(reference.folder), str(tmp_path / "imported"))
    tokenizer = RevqTokenizer.from_pretrained(target, device="cpu")

    generator = torch.Generator().manual_seed(1)
    latents = (torch.randn(6, *geometry.shape, generator=generator) * reference.std.view(geometry.shape)
               + reference.mean.view(geometry.shape))  # raw latents with the preprocessor's statistics
    expected_ids, expected = reference.forward(latents)
    ids = tokenizer.latents_to_ids(latents)
    rectified = tokenizer.ids_to_latents(ids)
    assert torch.equal(ids, expected_ids)
    assert ((rectified - expected).norm() / expected.norm()).item() < 1e-5
    torch.testing.assert_close(rectified, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(tokenizer.quantize(latents)[0], expected_ids)

    config = json.loads((target / "config.json").read_text())
    assert (config["num_tokens"], config["codebook_size"], config["token_dim"]) == \
        (geometry.tokens, geometry.codes, geometry.token_dim)
    assert config["latent_shape"] == list(geometry.shape)
    rectifier = {key: config["rectifier"][key] for key in ("kind", "width", "depth", "head_dim", "residual")}
    assert rectifier == {"kind": "vit", "width": geometry.width, "depth": geometry.depth, "head_dim": 32,
                         "residual": False}
    assert config["vae"] == {"source": REFERENCE_VAE, "class": "AutoencoderDC", "weights_sha256": None}
    assert config["image"] == recipe(256)
    provenance = config["provenance"]
    assert provenance["kind"] == "reference-import" and provenance["source"] == str(reference.folder.resolve())
    for role, file in (("config", f"{geometry.tokens}T_NC={geometry.codes}.yaml"), ("checkpoint", "ckpt.pth"),
                       ("preprocessor", "preprocessor.pth")):
        assert provenance["files"][role]["sha256"] == sha256(reference.folder / file)
    assert provenance["reference_config"] == yaml.safe_load(
        (reference.folder / f"{geometry.tokens}T_NC={geometry.codes}.yaml").read_text())
    assert provenance["checkpoint_epoch"] == 99 and "weights hash is not recorded" in provenance["vae_note"]


def test_latent_shape_without_input_data_size_is_dc_ae_at_256_with_the_reason(tmp_path):
    geometry = GEOMETRIES["512T"]
    write_reference(tmp_path / "ref", geometry, edit_yaml=lambda c: c["model"].pop("input_data_size"))
    tokenizer = import_reference(find_reference_files(tmp_path / "ref"), source="test")
    assert tokenizer.latent_shape == (32, 8, 8)
    assert "no --vae given" in tokenizer.provenance["latent_shape_from"]


def test_a_ddp_prefixed_checkpoint_imports_the_same(tmp_path):
    reference = write_reference(tmp_path / "ref", GEOMETRIES["512T"])
    checkpoint = torch.load(reference.folder / "ckpt.pth", weights_only=True)
    plain = import_reference(find_reference_files(reference.folder), source="plain").state_dict()
    torch.save({part: {f"module.{k}": v for k, v in checkpoint[part].items()} for part in ("quantizer", "decoder")},
               reference.folder / "ckpt.pth")
    prefixed = import_reference(find_reference_files(reference.folder), source="ddp").state_dict()
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)


# --- refusals ----------------------------------------------------------------------------------


def _import(folder: Path):
    return import_reference(find_reference_files(folder), source="test")


def test_num_group_other_than_tokens_per_data_is_refused(tmp_path):
    def shared_codebooks(config):
        config["model"]["quantizer"]["num_group"] = 256

    write_reference(tmp_path / "ref", GEOMETRIES["512T"], edit_yaml=shared_codebooks)
    with pytest.raises(ReferenceFormatError, match=r"512T_NC=16\.yaml: .*num_group=256 differs from "
                                                   r"tokens_per_data=512"):
        _import(tmp_path / "ref")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["quantizer"].update(tokens_per_data=256, num_group=256),  # a 256T yaml beside a 512T checkpoint
     r"num_group=512 codebooks, but the yaml's tokens_per_data is 256"),
    (lambda m: m["quantizer"].update(num_code=32), r"shape \(512, 16, 4\), but the yaml says num_code=32"),
    (lambda m: m["decoder"].update(block_out_channels=[128]),
     r"decoder tensor conv_in.weight has shape \(64, 32, 3, 3\), but .*needs \(128, 32, 3, 3\)"),
    (lambda m: m["decoder"].update(layers_per_block=[3]), r"the decoder has 2 EfficientViT blocks .* is \[3\]"),
    (lambda m: m["decoder"].update(attention_head_dim=16), r"attn.to_qkv_multiscale.0.proj_out.weight has shape"),
    (lambda m: m["decoder"].update(qkv_multiscales=[[3]]), r"qkv_multiscales=\[\[3\]\]"),
    (lambda m: m["decoder"].update(block_out_channels=[64, 64], layers_per_block=[2, 2]), r"has 2 stages"),
    (lambda m: m.update(input_data_size=[16, 8, 8]), r"latent_channels=32 but the latents have 16 channels"),
])
def test_a_yaml_that_contradicts_the_checkpoint_is_refused(tmp_path, edit, message):
    write_reference(tmp_path / "ref", GEOMETRIES["512T"], edit_yaml=lambda config: edit(config["model"]))
    with pytest.raises(ReferenceFormatError, match=message) as error:
        _import(tmp_path / "ref")
    assert str(tmp_path / "ref") in str(error.value)  # names the file


def test_missing_or_wrong_files_are_named(tmp_path):
    folder = tmp_path / "ref"
    write_reference(folder, GEOMETRIES["256T"])
    (folder / "preprocessor.pth").rename(tmp_path / "stats.pth")
    with pytest.raises(FileNotFoundError, match="preprocessor.pth is missing") as error:
        find_reference_files(folder)
    assert PREPROCESSOR_URL in str(error.value) and "--preprocessor" in str(error.value)
    assert find_reference_files(folder, tmp_path / "stats.pth").preprocessor == tmp_path / "stats.pth"

    torch.save(OrderedDict(mean=torch.zeros(1024), std=torch.ones(1024)), folder / "preprocessor.pth")
    with pytest.raises(ReferenceFormatError, match=r"mean has shape \(1024,\), but the latents are 32x8x8 = 2048"):
        _import(folder)
    (folder / "ckpt.pth").rename(folder / "256T_NC=16.pth")
    with pytest.raises(FileNotFoundError, match=r"ckpt.pth is missing \(found 256T_NC=16.pth"):
        find_reference_files(folder)
    torch.save({"model": {}}, folder / "ckpt.pth")
    with pytest.raises(ReferenceFormatError, match=r"holds \['model'\], not a ReVQ checkpoint"):
        _import(folder)
    (folder / "256T_NC=16.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="holds no reference yaml"):
        find_reference_files(folder)


def test_a_hub_id_offline_fails_fast_with_the_files_to_fetch(tmp_path, monkeypatch):
    import huggingface_hub

    def not_cached(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        assert local_files_only, "no download may be attempted without network"
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the hub cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(stage, "hub_unreachable_reason", lambda: "no network connection to huggingface.co:443")
    result = runner.invoke(app, ["import-reference", "AndyRaoTHU/revq-512T", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    for part in ("cannot download AndyRaoTHU/revq-512T (no network connection", "512T_NC=16384.yaml", "ckpt.pth",
                 "huggingface-cli download AndyRaoTHU/revq-512T", PREPROCESSOR_URL,
                 "models/revq-512T/preprocessor.pth", "revq-pipe import-reference models/revq-512T --out"):
        assert part in message, part
    assert not (tmp_path / "out").exists()


def test_output_folder_rules(tmp_path):
    first = write_reference(tmp_path / "first", GEOMETRIES["256T"], seed=0)
    second = write_reference(tmp_path / "second", GEOMETRIES["256T"], seed=1)
    out = tmp_path / "out"
    target = run_import_reference(str(first.folder), str(out))
    weights = (target / "model.safetensors").read_bytes()
    (out / "eval_val.json").write_text("{}")  # a report made with the imported tokenizer

    assert run_import_reference(str(first.folder), str(out)) == target  # the same import again: a no-op
    with pytest.raises(FileExistsError, match="is not empty .*pass --overwrite"):
        run_import_reference(str(second.folder), str(out))
    assert (target / "model.safetensors").read_bytes() == weights
    run_import_reference(str(second.folder), str(out), overwrite=True)
    assert (target / "model.safetensors").read_bytes() != weights
    assert json.loads((target / "config.json").read_text())["provenance"]["source"] == str(second.folder.resolve())

    run = tmp_path / "run"  # a training run is never replaced
    (run / "tokenizer").mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"state")
    with pytest.raises(FileExistsError, match="training run"):
        run_import_reference(str(first.folder), str(run), overwrite=True)
    result = runner.invoke(app, ["import-reference", str(second.folder), "--out", str(run)])
    assert result.exit_code == 2 and "--overwrite" in result.output


# --- round trip through the pipeline -----------------------------------------------------------


def import_tiny_reference(tmp_path: Path):
    """A reference-format checkpoint of the tiny VAE's (4, 4, 4) latents, imported with --vae into tmp/imported.

    Returns (setup, cache, geometry, reference, out)."""
    setup = make_eval_setup(tmp_path / "setup")
    cache = LatentCache.open(setup.cache)
    geometry = Geometry(shape=cache.latent_shape, tokens=16, codes=8, width=16, depth=1, head_dim=8)
    reference = write_reference(tmp_path / "published", geometry, mean=cache.mean, std=cache.std)
    out = tmp_path / "imported"
    result = runner.invoke(app, ["import-reference", str(reference.folder), "--out", str(out),
                                 "--vae", str(setup.vae)])
    assert result.exit_code == 0, result.output
    return setup, cache, geometry, reference, out


def test_round_trip_through_eval_tokenize_and_the_python_api(tmp_path):
    setup, cache, geometry, reference, out = import_tiny_reference(tmp_path)
    tokenizer = RevqTokenizer.from_pretrained(out / "tokenizer", device="cpu")
    vae = FrozenVAE.load(str(setup.vae), device="cpu")
    assert tokenizer.vae_identity == vae.identity and tokenizer.image_recipe == recipe(RESOLUTION)

    settings = [f"data.val_cache={setup.cache}", "vae.device=cpu", f"paths.root={tmp_path / 'artifacts'}"]
    overrides = [arg for s in settings for arg in ("--set", s)]
    result = runner.invoke(app, ["eval", "--from-cache", "--run", str(out), *overrides])
    assert result.exit_code == 0, result.output
    reports = sorted(out.glob("eval_val*.json"))  # the latent-level report, whatever its scope's file name
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    latents = cache.load_latents().float()
    ids, expected = reference.forward(latents)
    standardized = (latents - reference.mean.view(geometry.shape)) / reference.std.view(geometry.shape)
    reference_mse = ((expected - reference.mean.view(geometry.shape)) / reference.std.view(geometry.shape)
                     - standardized).double().pow(2).mean().item()
    assert report["num_images"] == cache.num_samples
    assert report["latent_mse"] == pytest.approx(reference_mse, rel=1e-4)

    store = tmp_path / "tokens.zarr"
    result = runner.invoke(app, ["tokenize", "--run", str(out), "--cache", str(setup.cache), "--out", str(store),
                                 *overrides])
    assert result.exit_code == 0, result.output
    assert np.array_equal(TokenStore.open(store).ids().astype(np.int64), ids.numpy())

    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokenizer = RevqTokenizer.from_pretrained(out / "tokenizer", vae=vae, device="cpu")
    image_ids = tokenizer.encode(images)
    assert torch.equal(image_ids, reference.forward(vae.encode(images))[0])
    decoded = tokenizer.decode(image_ids)
    assert decoded.shape == images.shape
    torch.testing.assert_close(decoded, vae.decode(reference.forward(vae.encode(images))[1]).clamp(-1, 1),
                               rtol=1e-4, atol=1e-4)


def test_fine_tuning_from_an_imported_tokenizer_starts_no_worse(tmp_path):
    """train --init-from an imported tokenizer: the first epoch validates no worse than the import itself."""
    setup, _, _, _, out = import_tiny_reference(tmp_path)
    settings = [f"data.train_cache={setup.cache}", f"data.val_cache={setup.cache}", "train.device=cpu",
                "quantizer.num_tokens=16", "quantizer.codebook_size=8", "rectifier.width=16", "rectifier.depth=1",
                "rectifier.head_dim=8", "rectifier.residual=false", "train.batch_size=4", "train.epochs=1"]
    overrides = [arg for s in settings for arg in ("--set", s)]
    own = runner.invoke(app, ["eval", "--from-cache", "--run", str(out), *overrides])
    assert own.exit_code == 0, own.output
    own_mse = json.loads((out / "eval_val_latents.json").read_text())["latent_mse"]
    result = runner.invoke(app, ["train", "--run", str(tmp_path / "tuned"), "--init-from", str(out / "tokenizer"),
                                 *overrides])
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["val_rect_mse"] <= own_mse, (first["val_rect_mse"], own_mse)
    refused = runner.invoke(app, ["train", "--run", str(tmp_path / "wrong"), "--init-from", str(out / "tokenizer"),
                                  *overrides, "--set", "rectifier.residual=true"])
    assert refused.exit_code == 2 and "rectifier.residual=False" in refused.output.replace("\n", "")
