"""RevqTokenizer: images <-> token ids through a frozen VAE, standardization, codebooks and a rectifier.

    images (B,3,R,R) -> VAE encoder -> latents (B,C,H,W) -> standardize -> T tokens of d values
    -> nearest code per position -> ids (B,T)
    ids -> codes -> (B,C,H,W) -> rectifier -> de-standardize -> VAE decoder -> images

A trained tokenizer is a folder with config.json (shapes, rectifier spec, VAE identity, image recipe)
and model.safetensors (codebooks, rectifier weights, normalizer mean/std); `from_pretrained` needs
nothing from the training code. The VAE is loaded only when images are involved.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec

if TYPE_CHECKING:
    from revq_pipe.pipeline.vae import FrozenVAE

TOKENIZER_FORMAT = "revq-tokenizer"
TOKENIZER_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_DERIVED_KEYS = ("format", "format_version", "package_version", "latent_shape", "num_tokens", "codebook_size",
                 "token_dim", "vae", "image")


class RevqTokenizer(nn.Module):
    """A trained ReVQ tokenizer.

    Args:
        normalizer: per-element standardization with the training cache's mean/std (C, H, W).
        quantizer: the T per-position codebooks (T, K, d).
        rectifier: module (B, C, H, W) -> (B, C, H, W) in standardized space.
        config: JSON-ready settings; must hold "rectifier" (the RectifierSpec fields), may hold
            "normalizer" (where its statistics came from), "search_memory_mb" and anything else to record.
        vae_identity: {"source", "class", "weights_sha256"} of the VAE whose latents it was trained on.
        image_recipe: {"resolution", "resize", "crop", "value_range"} the VAE's inputs were made with.
        vae: the VAE (a FrozenVAE, or a local folder / hub id to load on first use); None uses
            vae_identity["source"].
    """

    def __init__(self, normalizer: LatentNormalizer, quantizer: MultiGroupQuantizer, rectifier: nn.Module, *,
                 config: dict[str, Any], vae_identity: dict[str, Any], image_recipe: dict[str, Any],
                 vae: "FrozenVAE | str | None" = None) -> None:
        super().__init__()
        self.normalizer = normalizer
        self.quantizer = quantizer
        self.rectifier = rectifier
        self.config = dict(config)
        self.vae_identity = dict(vae_identity)
        self.image_recipe = dict(image_recipe)
        self._vae = None if vae is None or isinstance(vae, str) else vae
        self._vae_source = vae if isinstance(vae, str) else None
        self.eval()

    # --- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, vae: "FrozenVAE | str | None" = None,
                        device: str | torch.device = "auto") -> "RevqTokenizer":
        """Load a tokenizer folder written by `save_pretrained` (for example RUN/tokenizer)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer at {directory} ({path.name} is missing); point at the "
                                        "tokenizer/ folder of a finished `revq-pipe train` run")
        config = json.loads(config_path.read_text())
        if config.get("format") != TOKENIZER_FORMAT or config.get("format_version") != TOKENIZER_FORMAT_VERSION:
            raise ValueError(f"{config_path} is not a {TOKENIZER_FORMAT} config of version "
                             f"{TOKENIZER_FORMAT_VERSION} (format={config.get('format')!r}, "
                             f"version={config.get('format_version')!r})")
        latent_shape = tuple(config["latent_shape"])
        tokenizer = cls(
            LatentNormalizer(torch.zeros(latent_shape), torch.ones(latent_shape)),
            MultiGroupQuantizer(latent_shape, config["num_tokens"], config["codebook_size"],
                                search_memory_mb=config.get("search_memory_mb", 256)),
            build_rectifier(RectifierSpec(**config["rectifier"]), latent_shape[0]),
            config=config, vae_identity=config["vae"], image_recipe=config["image"], vae=vae)
        tokenizer.load_state_dict(load_file(weights_path, device="cpu"), strict=True)
        return tokenizer.to(device if isinstance(device, torch.device) else resolve_device(device)).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        config = {"format": TOKENIZER_FORMAT, "format_version": TOKENIZER_FORMAT_VERSION,
                  "package_version": _package_version(), "latent_shape": list(self.latent_shape),
                  "num_tokens": self.num_tokens, "codebook_size": self.codebook_size, "token_dim": self.token_dim,
                  **{k: v for k, v in self.config.items() if k not in _DERIVED_KEYS},
                  "vae": self.vae_identity, "image": self.image_recipe}
        if dataclasses.is_dataclass(config.get("rectifier")):
            config["rectifier"] = dataclasses.asdict(config["rectifier"])
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    # --- shapes -------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.normalizer.mean.shape)

    @property
    def num_tokens(self) -> int:
        return self.quantizer.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebooks.shape[1]

    @property
    def token_dim(self) -> int:
        return self.quantizer.codebooks.shape[2]

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebooks.device

    def token_layout(self) -> list[dict[str, int]]:
        """Where each token position sits in the (C, H, W) latent.

        Tokens are cut from the latent flattened in (C, H, W) order: position t covers flat indices
        [flat_start, flat_stop). (channel, row, col_start) is its first element; col_stop is one past
        the column of its last element, and num_rows is how many latent rows it touches (1 when the
        token lies inside one row; more when d > W or it crosses a row end, possibly into the next channel).
        """
        _, h, w = self.latent_shape
        d = self.token_dim
        layout = []
        for t in range(self.num_tokens):
            start, stop = t * d, (t + 1) * d
            first_row, last_row = start // w, (stop - 1) // w  # rows of the flattened (C*H, W) view
            layout.append({"position": t, "channel": first_row // h, "row": first_row % h,
                           "col_start": start % w, "col_stop": (stop - 1) % w + 1,
                           "flat_start": start, "flat_stop": stop, "num_rows": last_row - first_row + 1})
        return layout

    # --- latents <-> ids ----------------------------------------------------------------------

    @torch.no_grad()
    def latents_to_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, H, W) -> token ids (B, T) int64."""
        z = self.normalizer.normalize(self._check_latents(latents))
        return self.quantizer.nearest(self.quantizer.to_tokens(z))

    @torch.no_grad()
    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw latents -> (ids (B, T), quantized latents at raw scale, not rectified)."""
        ids = self.latents_to_ids(latents)
        return ids, self.normalizer.denormalize(self._codes(ids))

    @torch.no_grad()
    def rectify(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized raw-scale latents -> rectified raw-scale latents."""
        z = self.normalizer.normalize(self._check_latents(quantized))
        return self.normalizer.denormalize(self.rectifier(z))

    @torch.no_grad()
    def ids_to_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> rectified latents (B, C, H, W) at raw VAE scale, ready for the decoder."""
        return self.normalizer.denormalize(self.rectifier(self._codes(ids)))

    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, T) -> standardized quantized latents (B, C, H, W)."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"ids have shape {tuple(ids.shape)}; expected (B, {self.num_tokens})")
        ids = ids.to(self.device, torch.int64)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"ids range over [{int(ids.min())}, {int(ids.max())}]; expected 0..{self.codebook_size - 1}")
        return self.quantizer.from_tokens(self.quantizer.lookup(ids))

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this tokenizer expects (B, "
                             f"{', '.join(map(str, self.latent_shape))})")
        return latents.to(self.device, torch.float32)

    # --- images <-> ids -----------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R), uint8 0..255 or float in [-1, 1] -> token ids (B, T)."""
        resolution = self.image_recipe.get("resolution")
        if images.ndim != 4 or images.shape[1] != 3 or (
                resolution is not None and tuple(images.shape[2:]) != (resolution, resolution)):
            raise ValueError(f"images have shape {tuple(images.shape)}; this tokenizer expects (B, 3, {resolution}, "
                             f"{resolution}) made with the recipe {self.image_recipe} (see pipeline.images.preprocess)")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        vae = self.vae
        return self.latents_to_ids(vae.encode(images.to(vae.device, torch.float32)))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> images (B, 3, R, R) float in [-1, 1] (pipeline.images.to_uint8 for 8 bits)."""
        vae = self.vae
        return vae.decode(self.ids_to_latents(ids).to(vae.device)).clamp(-1.0, 1.0)

    @property
    def vae(self) -> "FrozenVAE":
        """The frozen VAE, loaded on first use from the given or the recorded source."""
        if self._vae is None:
            from revq_pipe.pipeline.vae import FrozenVAE

            source = self._vae_source or self.vae_identity.get("source")
            if not source:
                raise ValueError("this tokenizer was trained on latents of an unnamed VAE (imported cache); "
                                 "pass vae=FrozenVAE.load(...) or vae='folder or hub id' to from_pretrained")
            self._vae = FrozenVAE.load(source, device=self.device)
        self._check_vae(self._vae)
        return self._vae

    def _check_vae(self, vae: "FrozenVAE") -> None:
        expected, found = self.vae_identity.get("weights_sha256"), vae.identity.get("weights_sha256")
        if expected and found and expected != found:
            raise ValueError(f"the VAE {vae.identity.get('source')} (weights sha256 {found[:12]}...) is not the one "
                             f"this tokenizer was trained with ({self.vae_identity.get('source')}, "
                             f"{expected[:12]}...); pass the matching VAE")


def _package_version() -> str:
    try:
        return importlib.metadata.version("revq-pipe")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
