"""Import a tokenizer published with the ReVQ reference code (github.com/Neur-IO/ReVQ, MIT) as a RevqTokenizer.

A published tokenizer is three files (the hub repositories AndyRaoTHU/revq-512T, -256T-B, -256T-L hold the
first two; the third is ckpt/preprocessor.pth of the GitHub repository):

    <name>.yaml       the reference's config, e.g. 512T_NC=16384.yaml. Read here: model.input_data_size [C, H, W];
                      model.quantizer {TYPE vq, num_code K, num_group, tokens_per_data T}; model.decoder {TYPE dc_ae,
                      latent_channels, in_channels, attention_head_dim, block_type, block_out_channels [W],
                      layers_per_block [L], qkv_multiscales, norm_type, in_shortcut}.
    ckpt.pth          {"quantizer": {embeddings (num_group, K, d), index_offset (num_group,) = t*K,
                      count (num_group, K)}, "decoder": the DCAEDecoder state dict, and while training also
                      "optimizer", "scheduler", "epoch"}.
    preprocessor.pth  {"mean", "std"}: flat (C*H*W,) float32 statistics of the training latents.

The reference's inference, step by step, and what computes the same here (read from its xvq/dataset.py
Preprocessor, xvq/models/__init__.py Viewer and setup_models, quantizer.py Quantizer, dcae.py DCAEDecoder):

    Preprocessor     (z - mean) / std on the flat view         LatentNormalizer, statistics reshaped to (C, H, W)
    Viewer.shuffle   (B, C, H, W) -> view (B, T, d)           MultiGroupQuantizer.to_tokens (d = C*H*W / T)
    Quantizer        token t -> nearest code of group t        codebooks (T, K, d) when num_group == T; ours is the
                     (torch.cdist, then min)                   exact argmin, cdist's matmul form can break a near
                                                               tie the other way
    DCAEDecoder      conv_in(x) + x.repeat_interleave(W/C)     EfficientViTRectifier(residual=False): the same
                     -> up_blocks.0: L x EfficientViTBlock     modules (diffusers' EfficientViTBlock, RMSNorm,
                     -> norm_out (RMSNorm) -> ReLU -> conv_out nn.Conv2d) in the same order
    Preprocessor     x * std + mean                            LatentNormalizer.denormalize
      .inverse

State dict keys: conv_in.* -> rectifier.conv_in.*, up_blocks.0.<i>.* -> rectifier.blocks.<i>.*, norm_out.* ->
rectifier.norm_out.*, conv_out.* -> rectifier.conv_out.*, quantizer embeddings -> quantizer.codebooks. The
reference's index_offset (t*K, checked) and count (its usage counter since the last reset) have no counterpart.
The reference pins diffusers 0.33.1; EfficientViTBlock, SanaMultiscaleLinearAttention with its processor,
GLUMBConv and RMSNorm compute the same there as in the diffusers this project uses (0.42: only type hints and an
NPU code path differ).

Only what this correspondence covers is imported: one decoder stage of EfficientViT blocks at latent resolution
with multiscale (5,) attention and RMSNorm, its input shortcut on, and one codebook per token position. Anything
else in a yaml or checkpoint is refused with a message that names the file, the value and what to do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from revq_pipe.pipeline.files import file_sha256
from revq_pipe.pipeline.images import recipe
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.pipeline.tokenizer import RevqTokenizer

if TYPE_CHECKING:
    from revq_pipe.pipeline.vae import FrozenVAE

REFERENCE_CODE = "https://github.com/Neur-IO/ReVQ"
REFERENCE_VAE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"  # its README's download step and inference example
REFERENCE_VAE_CHANNELS, REFERENCE_VAE_COMPRESSION = 32, 32  # DC-AE f32c32
REFERENCE_LATENT_SHAPE = (32, 8, 8)  # DC-AE f32c32 at 256x256; the reference's Viewer and Preprocessor hard-code it
PUBLISHED = ("AndyRaoTHU/revq-512T", "AndyRaoTHU/revq-256T-B", "AndyRaoTHU/revq-256T-L")
CHECKPOINT_NAME = "ckpt.pth"
PREPROCESSOR_NAME = "preprocessor.pth"
PREPROCESSOR_URL = f"{REFERENCE_CODE}/raw/master/ckpt/preprocessor.pth"
IMPORT_KIND = "reference-import"
KEY_MAPPING = {"conv_in.*": "rectifier.conv_in.*", "up_blocks.0.<i>.*": "rectifier.blocks.<i>.*",
               "norm_out.*": "rectifier.norm_out.*", "conv_out.*": "rectifier.conv_out.*",
               "quantizer.embeddings": "quantizer.codebooks", "preprocessor mean, std": "normalizer.mean, std"}
_BLOCK_KEY = re.compile(r"^up_blocks\.0\.(\d+)\.(.+)$")
_STEM_AND_HEAD = ("conv_in.", "norm_out.", "conv_out.")


class ReferenceFormatError(ValueError):
    """A reference yaml, checkpoint or preprocessor that cannot be imported; the message says why and what to do."""


@dataclass(frozen=True)
class ReferenceFiles:
    """The three files of a published tokenizer."""

    config: Path  # the reference yaml
    checkpoint: Path  # ckpt.pth
    preprocessor: Path  # preprocessor.pth


@dataclass(frozen=True)
class ReferenceGeometry:
    """What the reference yaml says the tokenizer is."""

    latent_shape: tuple[int, int, int]  # (C, H, W)
    num_tokens: int  # T = tokens_per_data = num_group
    token_dim: int  # d = C*H*W / T
    codebook_size: int  # K = num_code
    width: int  # W = block_out_channels[0]
    depth: int  # L = layers_per_block[0]
    head_dim: int  # attention_head_dim
    latent_shape_from: str  # where (C, H, W) came from


# --- finding and reading the files ------------------------------------------------------------


def find_reference_files(folder: str | Path, preprocessor: str | Path | None = None) -> ReferenceFiles:
    """The yaml and ckpt.pth in `folder`, and `preprocessor` (default folder/preprocessor.pth)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder holding a published tokenizer's yaml and "
                                f"{CHECKPOINT_NAME} (for example `huggingface-cli download {PUBLISHED[0]} "
                                f"--local-dir models/revq-512T`)")
    configs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
    if not configs:
        raise FileNotFoundError(f"{folder} holds no reference yaml (such as 512T_NC=16384.yaml); download it with "
                                f"{CHECKPOINT_NAME} from the tokenizer's hub repository ({', '.join(PUBLISHED)})")
    if len(configs) > 1:
        raise ReferenceFormatError(f"{folder} holds {len(configs)} yaml files ({', '.join(p.name for p in configs)}); "
                                   "keep only the one published with this ckpt.pth")
    checkpoint = folder / CHECKPOINT_NAME
    if not checkpoint.is_file():
        others = sorted(p.name for p in folder.glob("*.pth") if p.name != PREPROCESSOR_NAME)
        hint = f" (found {', '.join(others)}: name the tokenizer's checkpoint {CHECKPOINT_NAME})" if others else ""
        raise FileNotFoundError(f"{checkpoint} is missing{hint}; download {CHECKPOINT_NAME} from the tokenizer's hub "
                                f"repository ({', '.join(PUBLISHED)})")
    stats = Path(preprocessor) if preprocessor is not None else folder / PREPROCESSOR_NAME
    if not stats.is_file():
        raise FileNotFoundError(f"{stats} is missing: the latent statistics are not in the hub repositories but in "
                                f"the reference code's repository; download {PREPROCESSOR_URL} to "
                                f"{folder / PREPROCESSOR_NAME} or pass --preprocessor FILE")
    return ReferenceFiles(config=configs[0], checkpoint=checkpoint, preprocessor=stats)


def read_reference_config(path: str | Path) -> dict[str, Any]:
    """The reference yaml as a plain dict (OmegaConf interpolations such as ${workspace} stay strings)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ReferenceFormatError(f"{path} is not valid YAML ({error}); download it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ReferenceFormatError(f"{path} has no `model:` section, so it is not a ReVQ reference config (such as "
                                   "512T_NC=16384.yaml); pass the yaml published with the checkpoint")
    return data


# --- geometry from the yaml -------------------------------------------------------------------


def reference_geometry(reference: dict[str, Any], where: str | Path,
                       vae: "FrozenVAE | None" = None) -> ReferenceGeometry:
    """Validate the yaml's model section and return the tokenizer it describes.

    The latent shape comes from model.input_data_size; if the yaml has none, from `vae` at 256x256, else it
    is DC-AE f32c32's (32, 8, 8), and `latent_shape_from` says which.
    """
    model = reference["model"]
    quantizer, decoder = _section(model, "quantizer", where), _section(model, "decoder", where)
    _expect(quantizer.get("TYPE", "vq") == "vq", where, f"model.quantizer.TYPE is {quantizer.get('TYPE')!r}; only "
            "the reference's vector quantizer ('vq') can be imported")
    _expect(decoder.get("TYPE", "dc_ae") == "dc_ae", where, f"model.decoder.TYPE is {decoder.get('TYPE')!r}; only "
            "the EfficientViT rectifier ('dc_ae', the paper's) can be imported")

    latent_shape, origin = _latent_shape(model, where, vae)
    size = math.prod(latent_shape)
    num_tokens = _positive_int(quantizer, "tokens_per_data", where)
    num_group = quantizer.get("num_group", num_tokens)  # the reference's Quantizer defaults it so
    _expect(num_group == num_tokens, where, f"model.quantizer.num_group={num_group} differs from tokens_per_data="
            f"{num_tokens}: the reference then shares each codebook between several token positions, which a "
            "revq-pipe tokenizer (one codebook per position) cannot represent; only num_group == tokens_per_data "
            "(as in every published tokenizer) can be imported")
    _expect(size % num_tokens == 0, where, f"tokens_per_data={num_tokens} does not divide the latent size "
            f"{'x'.join(map(str, latent_shape))} = {size} ({origin})")
    token_dim = size // num_tokens
    if "code_dim" in quantizer:
        _expect(quantizer["code_dim"] == token_dim, where, f"model.quantizer.code_dim={quantizer['code_dim']} but "
                f"C*H*W / tokens_per_data = {size} / {num_tokens} = {token_dim}")
    codebook_size = _positive_int(quantizer, "num_code", where)

    channels = latent_shape[0]
    for key in ("latent_channels", "in_channels"):  # the decoder's input and output channels
        _expect(decoder.get(key) == channels, where, f"model.decoder.{key}={decoder.get(key)} but the latents have "
                f"{channels} channels ({origin}); the rectifier maps latents to latents")
    widths, depths = _int_list(decoder, "block_out_channels", where), _int_list(decoder, "layers_per_block", where)
    _expect(len(widths) == 1 and len(depths) == 1, where, f"model.decoder has {len(widths)} stages "
            f"(block_out_channels={widths}, layers_per_block={depths}); the rectifier is one stage at latent "
            "resolution, e.g. block_out_channels: [512], layers_per_block: [3]")
    width, depth = widths[0], depths[0]
    _expect(depth >= 1, where, "model.decoder.layers_per_block=[0]: the reference then ends in an upsampling block, "
            "which is no rectifier")
    block_type = decoder.get("block_type", "ResBlock")
    _expect(block_type in ("EfficientViTBlock", ["EfficientViTBlock"]), where,
            f"model.decoder.block_type={block_type!r}; only [EfficientViTBlock] can be imported")
    multiscales = decoder.get("qkv_multiscales")
    _expect(multiscales == [[5]], where, f"model.decoder.qkv_multiscales={multiscales!r}; the rectifier's blocks use "
            "[[5]] (multiscale 5x5 aggregation)")
    norm = decoder.get("norm_type", "rms_norm")
    _expect(norm in ("rms_norm", ["rms_norm"]), where, f"model.decoder.norm_type={norm!r}; the rectifier's blocks "
            "use rms_norm")
    _expect(decoder.get("in_shortcut", True) is True, where, "model.decoder.in_shortcut is false; the rectifier's "
            "stem always adds the channel-repeat shortcut")
    head_dim = decoder.get("attention_head_dim", 32)  # DCAEDecoder's default
    _expect(isinstance(head_dim, int) and head_dim >= 1 and width % head_dim == 0, where,
            f"model.decoder.attention_head_dim={head_dim!r} must be a positive divisor of the width {width}")
    _expect(width % channels == 0, where, f"model.decoder.block_out_channels=[{width}] is not a multiple of the "
            f"{channels} latent channels (the stem's shortcut repeats each channel width/channels times)")
    return ReferenceGeometry(latent_shape=latent_shape, num_tokens=num_tokens, token_dim=token_dim,
                             codebook_size=codebook_size, width=width, depth=depth, head_dim=head_dim,
                             latent_shape_from=origin)


def _latent_shape(model: dict, where: str | Path, vae: "FrozenVAE | None") -> tuple[tuple[int, int, int], str]:
    if "input_data_size" in model:
        shape = model["input_data_size"]
        _expect(isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape),
                where, f"model.input_data_size={shape!r} is not a latent shape [C, H, W]")
        return tuple(shape), f"model.input_data_size of {where}"
    if vae is not None:
        return vae.latent_shape(256), f"not in {where}: the latent of the VAE {vae.source} at 256x256"
    return REFERENCE_LATENT_SHAPE, (f"not in {where} and no --vae given: DC-AE f32c32 at 256x256, the shape the "
                                    "reference code hard-codes (its Viewer and Preprocessor use [32, 8, 8])")


def _section(model: dict, name: str, where: str | Path) -> dict:
    section = model.get(name)
    _expect(isinstance(section, dict), where, f"model.{name} is missing; is this the yaml published with the "
            "checkpoint?")
    return section


def _positive_int(section: dict, key: str, where: str | Path) -> int:
    value = section.get(key)
    _expect(isinstance(value, int) and not isinstance(value, bool) and value >= 1, where,
            f"{key}={value!r} must be a positive integer")
    return value


def _int_list(section: dict, key: str, where: str | Path) -> list[int]:
    value = section.get(key)
    _expect(isinstance(value, list) and all(isinstance(v, int) for v in value), where,
            f"model.decoder.{key}={value!r} must be a list of integers")
    return value


def _expect(condition: bool, where: str | Path, message: str) -> None:
    if not condition:
        raise ReferenceFormatError(f"{where}: {message}")


# --- checkpoint and preprocessor --------------------------------------------------------------


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """ckpt.pth as saved by the reference (read with weights_only, onto the CPU); a DDP "module." prefix is dropped."""
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or not {"quantizer", "decoder"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ReferenceFormatError(f"{path} holds {found}, not a ReVQ checkpoint with 'quantizer' and 'decoder' state "
                                   f"dicts; pass the {CHECKPOINT_NAME} of a published tokenizer")
    return {**checkpoint, **{part: _strip_ddp(checkpoint[part]) for part in ("quantizer", "decoder")}}


def load_reference_preprocessor(path: str | Path, geometry: ReferenceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """preprocessor.pth -> (mean, std), each (C, H, W) float32."""
    state = _torch_load(path)
    if not isinstance(state, dict) or not {"mean", "std"} <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ReferenceFormatError(f"{path} holds {found}, not the reference's preprocessor {{'mean', 'std'}}; "
                                   f"download {PREPROCESSOR_URL}")
    size = math.prod(geometry.latent_shape)
    stats = []
    for name in ("mean", "std"):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != size:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ReferenceFormatError(
                f"{path}: {name} has shape {shape}, but the latents are {'x'.join(map(str, geometry.latent_shape))} "
                f"= {size} values ({geometry.latent_shape_from}); this preprocessor belongs to another VAE or "
                f"resolution (the published one is {PREPROCESSOR_URL})")
        stats.append(tensor.detach().to(torch.float32).reshape(geometry.latent_shape))
    mean, std = stats
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()) or (std <= 0).any():
        raise ReferenceFormatError(f"{path}: std has {int((std <= 0).sum())} entries <= 0 or the statistics are not "
                                   f"finite; the file is damaged, download {PREPROCESSOR_URL} again")
    return mean, std


def _torch_load(path: str | Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # the published files were saved on CUDA
    except Exception as error:  # pickle, zip and weights_only refusals come in many types
        raise ReferenceFormatError(f"cannot read {path} as a PyTorch file ({type(error).__name__}: "
                                   f"{str(error).splitlines()[0][:200]}); download it again") from None


def _strip_ddp(state: Any) -> Any:
    """A state dict saved from a DistributedDataParallel wrapper carries "module." before every key."""
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


# --- mapping onto a RevqTokenizer -------------------------------------------------------------


def rectifier_key(reference_key: str) -> str | None:
    """A DCAEDecoder state dict key -> the EfficientViTRectifier key holding the same tensor (None: no counterpart)."""
    block = _BLOCK_KEY.match(reference_key)
    if block:
        return f"blocks.{block[1]}.{block[2]}"
    return reference_key if reference_key.startswith(_STEM_AND_HEAD) else None


def quantizer_codebooks(state: dict[str, Any], geometry: ReferenceGeometry, where: str | Path) -> torch.Tensor:
    """The reference Quantizer state dict -> codebooks (T, K, d), after checking it against the yaml."""
    _expect(isinstance(state, dict), where, "'quantizer' is not a state dict")
    unexpected = sorted(set(state) - {"embeddings", "index_offset", "count"})
    _expect("embeddings" in state and not unexpected, where, f"the quantizer state dict holds {sorted(state)}; the "
            "reference's Quantizer has embeddings, index_offset and count")
    t, k, d = geometry.num_tokens, geometry.codebook_size, geometry.token_dim
    embeddings = state["embeddings"]
    shape = tuple(embeddings.shape)
    _expect(len(shape) == 3, where, f"quantizer.embeddings has shape {shape}; expected (num_group, num_code, "
            f"code_dim) = ({t}, {k}, {d})")
    _expect(shape[0] == t, where, f"quantizer.embeddings has num_group={shape[0]} codebooks, but the yaml's "
            f"tokens_per_data is {t}; a revq-pipe tokenizer needs one codebook per token position; use the yaml "
            "published with this checkpoint")
    _expect(shape[1:] == (k, d), where, f"quantizer.embeddings has shape {shape}, but the yaml says num_code={k} "
            f"codes of code_dim={d} (latent {'x'.join(map(str, geometry.latent_shape))} / {t} tokens); use the yaml "
            "published with this checkpoint")
    if "index_offset" in state:
        expected = torch.arange(t, dtype=torch.int64) * k
        offset = state["index_offset"]
        _expect(tuple(offset.shape) == (t,) and torch.equal(offset.to(torch.int64), expected), where,
                f"quantizer.index_offset is not [0, {k}, 2*{k}, ...]; the checkpoint is inconsistent")
    if "count" in state:
        _expect(tuple(state["count"].shape) == (t, k), where, f"quantizer.count has shape "
                f"{tuple(state['count'].shape)}; expected ({t}, {k})")
    return embeddings.detach().to(torch.float32)


def rectifier_state(decoder: dict[str, Any], rectifier: torch.nn.Module, geometry: ReferenceGeometry,
                    where: str | Path) -> dict[str, torch.Tensor]:
    """The DCAEDecoder state dict renamed for `rectifier`; every parameter and shape must match the yaml's
    rectifier (the gate, which the reference does not have, loads as 1: pipeline/rectifier.py)."""
    _expect(isinstance(decoder, dict), where, "'decoder' is not a state dict")
    expected = {k: tuple(v.shape) for k, v in rectifier.named_parameters()}
    mapped = {rectifier_key(k): k for k in decoder if rectifier_key(k) in expected}
    unknown = sorted(k for k in decoder if rectifier_key(k) not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    blocks = {int(m[1]) for k in decoder if (m := _BLOCK_KEY.match(k))}
    sizes = (f"width {geometry.width}, depth {geometry.depth}, head_dim {geometry.head_dim}, "
             f"{geometry.latent_shape[0]} channels")
    _expect(len(blocks) == geometry.depth, where, f"the decoder has {len(blocks)} EfficientViT blocks "
            f"(up_blocks.0.<i>), but the yaml's layers_per_block is [{geometry.depth}]; use the yaml published with "
            "this checkpoint")
    _expect(not unknown and not missing, where, f"the decoder state dict does not match the rectifier the yaml "
            f"describes ({sizes}): unexpected {unknown[:6]}, missing {missing[:6]}")
    state = {}
    for key, reference_key in mapped.items():
        tensor = decoder[reference_key]
        _expect(tuple(tensor.shape) == expected[key], where, f"decoder tensor {reference_key} has shape "
                f"{tuple(tensor.shape)}, but the yaml's rectifier ({sizes}) needs {expected[key]}; use the yaml "
                "published with this checkpoint")
        state[key] = tensor.detach().to(torch.float32)
    return state


def vae_identity_and_recipe(geometry: ReferenceGeometry, vae: "FrozenVAE | None") -> tuple[dict, dict, str]:
    """The VAE the latents come from, the image recipe that gives latents of this shape, and a note on both."""
    channels, height, width = geometry.latent_shape
    if height != width:
        raise ReferenceFormatError(f"the latent shape {geometry.latent_shape} ({geometry.latent_shape_from}) is not "
                                   "square; the image recipe makes square R x R crops")
    if vae is not None:
        resolution = height * vae.spatial_compression
        if vae.latent_shape(resolution) != geometry.latent_shape:
            raise ReferenceFormatError(
                f"the VAE {vae.source} makes {vae.latent_shape(resolution)} latents at {resolution}x{resolution}, but "
                f"the tokenizer expects {geometry.latent_shape} ({geometry.latent_shape_from}); pass the VAE it was "
                f"trained on ({REFERENCE_VAE} for the published tokenizers)")
        return vae.identity, recipe(resolution), f"VAE identity from --vae {vae.source}"
    if channels != REFERENCE_VAE_CHANNELS:
        raise ReferenceFormatError(
            f"the latents have {channels} channels ({geometry.latent_shape_from}), so they are not from "
            f"{REFERENCE_VAE} ({REFERENCE_VAE_CHANNELS} channels); pass --vae with the VAE the tokenizer was "
            "trained on")
    identity = {"source": REFERENCE_VAE, "class": "AutoencoderDC", "weights_sha256": None}
    note = (f"VAE named, not loaded: {REFERENCE_VAE} is the reference's VAE, but no --vae was given, so its weights "
            "hash is not recorded (None) and any VAE from that source is accepted; import again with --vae "
            "PATH_OR_ID to record it")
    return identity, recipe(height * REFERENCE_VAE_COMPRESSION), note


# --- the import -------------------------------------------------------------------------------


def import_reference(files: ReferenceFiles, *, source: str, vae: "FrozenVAE | None" = None) -> RevqTokenizer:
    """Build a RevqTokenizer from a published tokenizer's files.

    Args:
        files: the reference yaml, ckpt.pth and preprocessor.pth.
        source: where they came from (a hub id or a local folder), recorded in the provenance.
        vae: the VAE the tokenizer was trained on, to record its identity (weights hash); None names the
            reference's DC-AE without a hash.
    """
    reference = read_reference_config(files.config)
    geometry = reference_geometry(reference, files.config, vae)
    where = f"{files.checkpoint} (with {files.config.name})"
    checkpoint = load_reference_checkpoint(files.checkpoint)
    codebooks = quantizer_codebooks(checkpoint["quantizer"], geometry, where)
    spec = RectifierSpec(kind="vit", width=geometry.width, depth=geometry.depth, head_dim=geometry.head_dim,
                         residual=False)
    rectifier = build_rectifier(spec, geometry.latent_shape[0])
    rectifier.load_state_dict(rectifier_state(checkpoint["decoder"], rectifier, geometry, where), strict=True)
    mean, std = load_reference_preprocessor(files.preprocessor, geometry)
    quantizer = MultiGroupQuantizer(geometry.latent_shape, geometry.num_tokens, geometry.codebook_size)
    with torch.no_grad():
        quantizer.codebooks.copy_(codebooks)
    vae_identity, image_recipe, vae_note = vae_identity_and_recipe(geometry, vae)
    return RevqTokenizer(LatentNormalizer(mean, std), quantizer, rectifier, rectifier_spec=spec,
                         vae_identity=vae_identity, image_recipe=image_recipe,
                         provenance=_provenance(files, source, reference, geometry, checkpoint, vae_note))


def _provenance(files: ReferenceFiles, source: str, reference: dict, geometry: ReferenceGeometry,
                checkpoint: dict, vae_note: str) -> dict[str, Any]:
    """What the tokenizer config records about where an imported tokenizer came from."""
    count = checkpoint["quantizer"].get("count")
    epoch = checkpoint.get("epoch")
    return {
        "kind": IMPORT_KIND,
        "reference_code": REFERENCE_CODE,
        "source": source,
        "normalizer": "the reference's preprocessor: per-element mean and std of its training latents",
        "files": {role: {"path": str(path.resolve()), "sha256": file_sha256(path)}
                  for role, path in (("config", files.config), ("checkpoint", files.checkpoint),
                                     ("preprocessor", files.preprocessor))},
        "latent_shape_from": geometry.latent_shape_from,
        "vae_note": vae_note,
        "rectifier_form": "the reference's plain DCAEDecoder (residual=false): output = head(blocks(stem(x)))",
        "key_mapping": KEY_MAPPING,
        "checkpoint_epoch": epoch if isinstance(epoch, int) else None,
        # the reference's count buffer: codes chosen since its last reset (its last validation pass when trained)
        "checkpoint_codebook_usage": float((count > 0.5).double().mean()) if count is not None else None,
        "reference_config": reference,
    }
