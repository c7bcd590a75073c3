"""RevqTokenizer: images <-> token ids through a frozen VAE, standardization, codebooks and a rectifier.

    images (B,3,R,R) -> VAE encoder -> latents (B,C,H,W) -> standardize -> T tokens of d values
    -> nearest code per position -> ids (B,T)
    ids -> codes -> (B,C,H,W) -> rectifier -> de-standardize -> VAE decoder -> images

A trained tokenizer is a folder with config.json (a TokenizerConfig: shapes, rectifier spec, VAE
identity, image recipe, provenance) and model.safetensors (codebooks, rectifier weights, normalizer
mean/std); `from_pretrained` needs nothing from the training code. The VAE is loaded only when
images are involved.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.files import atomic_directory
from revq_pipe.pipeline.images import as_model_batch, to_uint8
from revq_pipe.pipeline.normalizer import LatentNormalizer
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.pipeline.vae_identity import require_same_vae
from revq_pipe.pipeline.version import package_version

if TYPE_CHECKING:
    from revq_pipe.pipeline.vae import FrozenVAE

TOKENIZER_FORMAT = "revq-tokenizer"
TOKENIZER_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TokenizerConfig:
    """What config.json holds besides the format header.

    Args:
        latent_shape: (C, H, W) of the VAE latents.
        num_tokens, codebook_size, token_dim: T, K and d = C*H*W / T.
        rectifier: the rectifier's spec.
        vae: identity {"source", "class", "weights_sha256"} of the VAE whose latents it was made for.
        image: the recipe {"resolution", "resize", "crop", "value_range"} of the VAE's inputs.
        provenance: where the tokenizer came from (the training caches and run, or an imported
            checkpoint with its file hashes); recorded, never interpreted.
    """

    latent_shape: tuple[int, int, int]
    num_tokens: int
    codebook_size: int
    token_dim: int
    rectifier: RectifierSpec
    vae: dict[str, Any]
    image: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": TOKENIZER_FORMAT, "format_version": TOKENIZER_FORMAT_VERSION,
                "package_version": package_version(), **dataclasses.asdict(self)}

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "TokenizerConfig":
        """The config.json of a tokenizer folder (FileNotFoundError naming what is missing)."""
        directory = Path(directory)
        for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer at {directory} ({path.name} is missing); point at the "
                                        "tokenizer/ folder of a finished `revq-pipe train` run")
        return cls.from_json(json.loads((directory / CONFIG_NAME).read_text()), str(directory / CONFIG_NAME))

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "TokenizerConfig":
        if data.get("format") != TOKENIZER_FORMAT or data.get("format_version") != TOKENIZER_FORMAT_VERSION:
            raise ValueError(f"{where} is not a {TOKENIZER_FORMAT} config of version {TOKENIZER_FORMAT_VERSION} "
                             f"(format={data.get('format')!r}, version={data.get('format_version')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        try:
            values["latent_shape"] = tuple(values["latent_shape"])
            values["rectifier"] = RectifierSpec(**values["rectifier"])
            return cls(**values)
        except (KeyError, TypeError) as error:
            raise ValueError(f"{where} is damaged or incomplete ({error}); save the tokenizer again") from None


@dataclass
class LatentRoundTrip:
    """One batch of latents through the tokenizer; the standardized tensors are (B, C, H, W)."""

    ids: torch.Tensor  # (B, T) int64
    clean: torch.Tensor  # standardized VAE latents
    quantized: torch.Tensor  # standardized codes, before the rectifier
    rectified: torch.Tensor  # standardized rectifier output
    decoder_input: torch.Tensor  # rectified latents at raw VAE scale: what ids_to_latents(ids) gives

    def squared_errors(self) -> torch.Tensor:
        """float64 (values, quantized SSE, rectified SSE) against the clean latents, summable over batches."""
        return torch.stack([torch.tensor(float(self.clean.numel()), dtype=torch.float64, device=self.clean.device),
                            (self.quantized - self.clean).double().square().sum(),
                            (self.rectified - self.clean).double().square().sum()])


@dataclass
class Reconstructions:
    """One batch of 8-bit images (B, 3, R, R) and the tokenizer's latents."""

    original: torch.Tensor
    vae: torch.Tensor  # decode(z): the continuous ceiling
    tokenizer: torch.Tensor  # decode(ids_to_latents(ids))
    latents: LatentRoundTrip


class RevqTokenizer(nn.Module):
    """A trained ReVQ tokenizer.

    Args:
        normalizer: per-element standardization with the training cache's mean/std (C, H, W).
        quantizer: the T per-position codebooks (T, K, d).
        rectifier: module (B, C, H, W) -> (B, C, H, W) in standardized space, built from `rectifier_spec`.
        rectifier_spec: the spec the rectifier was built from.
        vae_identity: {"source", "class", "weights_sha256"} of the VAE whose latents it was trained on.
        image_recipe: {"resolution", "resize", "crop", "value_range"} the VAE's inputs were made with.
        provenance: where the tokenizer came from, recorded in config.json.
        vae: the VAE (a FrozenVAE, or a local folder / hub id to load on first use); None uses
            vae_identity["source"]. Its weights must match vae_identity.
    """

    def __init__(self, normalizer: LatentNormalizer, quantizer: MultiGroupQuantizer, rectifier: nn.Module, *,
                 rectifier_spec: RectifierSpec, vae_identity: dict[str, Any], image_recipe: dict[str, Any],
                 provenance: dict[str, Any] | None = None, vae: "FrozenVAE | str | None" = None) -> None:
        super().__init__()
        if tuple(normalizer.mean.shape) != quantizer.latent_shape:
            raise ValueError(f"the normalizer's statistics have shape {tuple(normalizer.mean.shape)} but the "
                             f"quantizer cuts latents of shape {quantizer.latent_shape}")
        self.normalizer = normalizer
        self.quantizer = quantizer
        self.rectifier = rectifier
        self.rectifier_spec = rectifier_spec
        self.vae_identity = dict(vae_identity)
        self.image_recipe = dict(image_recipe)
        self.provenance = dict(provenance or {})
        self._vae = None
        self._vae_source = vae if isinstance(vae, str) else None
        if vae is not None and not isinstance(vae, str):
            self.attach_vae(vae)
        self.eval()

    # --- loading and saving -----------------------------------------------------------------

    @property
    def config(self) -> TokenizerConfig:
        """The typed config, derived from the modules and the recorded identity."""
        return TokenizerConfig(latent_shape=self.latent_shape, num_tokens=self.num_tokens,
                               codebook_size=self.codebook_size, token_dim=self.token_dim,
                               rectifier=self.rectifier_spec, vae=self.vae_identity, image=self.image_recipe,
                               provenance=self.provenance)

    @classmethod
    def from_config(cls, config: TokenizerConfig, vae: "FrozenVAE | str | None" = None) -> "RevqTokenizer":
        """An untrained tokenizer of the config's shapes (unit statistics, random codes, fresh rectifier)."""
        shape = tuple(config.latent_shape)
        return cls(LatentNormalizer(torch.zeros(shape), torch.ones(shape)),
                   MultiGroupQuantizer(shape, config.num_tokens, config.codebook_size),
                   build_rectifier(config.rectifier, shape[0]), rectifier_spec=config.rectifier,
                   vae_identity=config.vae, image_recipe=config.image, provenance=config.provenance, vae=vae)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, vae: "FrozenVAE | str | None" = None,
                        device: str | torch.device = "auto") -> "RevqTokenizer":
        """Load a tokenizer folder written by `save_pretrained` (for example RUN/tokenizer)."""
        config = TokenizerConfig.read(directory)
        tokenizer = cls.from_config(config, vae=vae)
        tokenizer.load_state_dict(load_file(Path(directory) / WEIGHTS_NAME, device="cpu"), strict=True)
        return tokenizer.to(device if isinstance(device, torch.device) else resolve_device(device)).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into `directory`, replacing it as a whole (atomically)."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        with atomic_directory(directory) as tmp:
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        return Path(directory)

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

    def standardize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, H, W) -> the standardized space the codebooks and rectifier live in."""
        return self.normalizer.normalize(self._check_latents(latents))

    def destandardize(self, standardized: torch.Tensor) -> torch.Tensor:
        """Standardized latents (B, C, H, W) -> raw VAE scale, ready for the decoder."""
        return self.normalizer.denormalize(standardized)

    @torch.no_grad()
    def latents_to_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, H, W) -> token ids (B, T) int64."""
        return self.quantizer.nearest(self.quantizer.to_tokens(self.standardize(latents)))

    @torch.no_grad()
    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw latents -> (ids (B, T), quantized latents at raw scale, not rectified)."""
        ids = self.latents_to_ids(latents)
        return ids, self.destandardize(self._codes(ids))

    @torch.no_grad()
    def rectify(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized raw-scale latents -> rectified raw-scale latents."""
        return self.destandardize(self.rectifier(self.standardize(quantized)))

    @torch.no_grad()
    def ids_to_latents(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Token ids (B, T) -> rectified latents (B, C, H, W) at raw VAE scale, ready for the decoder."""
        return self.destandardize(self.rectifier(self._codes(ids)))

    @torch.no_grad()
    def round_trip(self, latents: torch.Tensor) -> LatentRoundTrip:
        """Raw VAE latents -> ids and every intermediate latent (the same operations as ids_to_latents)."""
        clean = self.standardize(latents)
        ids = self.quantizer.nearest(self.quantizer.to_tokens(clean))
        quantized = self._codes(ids)
        rectified = self.rectifier(quantized)
        return LatentRoundTrip(ids=ids, clean=clean, quantized=quantized, rectified=rectified,
                               decoder_input=self.destandardize(rectified))

    def _codes(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Ids (B, T) of any integer dtype (a tensor or a numpy array) -> standardized quantized latents."""
        if isinstance(ids, np.ndarray):
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"ids have dtype {ids.dtype}; expected integers")
            ids = torch.from_numpy(ids.astype(np.int64))
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids have dtype {ids.dtype}; expected integers")
        if ids.ndim == 1:
            ids = ids[None]
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

    # What images go through: the one place that decides the VAE and the image side (the Python API and
    # every command that takes a run ask these two).

    def vae_source(self, named: str | None = None) -> str:
        """The VAE for images: `named` (a local folder or hub id) when given, else the one the tokenizer records.

        A named VAE is still checked against the recorded weights hash when it is attached.
        """
        source = named or self.vae_identity.get("source")
        if not source:
            raise ValueError("this tokenizer records no VAE (it was trained on latents of an unnamed VAE, an imported "
                             "cache); name the VAE those latents came from: vae='folder or hub id' in Python, "
                             "--vae PATH_OR_ID on the command line")
        return source

    def image_resolution(self, named: int | None = None, what: str = "resolution") -> int:
        """The image side of the VAE's inputs: the tokenizer's recorded recipe. A `named` side (called `what` in
        messages) must agree with it, since the codebooks were trained on latents of images of that side; it is
        used only when no recipe is recorded (a tokenizer trained on imported latents)."""
        recorded = self.image_recipe.get("resolution")
        if recorded is None:
            if named is None:
                raise ValueError("this tokenizer records no image resolution (it was trained on imported latents); "
                                 "its image recipe is unknown, so it can only work on latents")
            return int(named)
        if named is not None and int(named) != int(recorded):
            raise ValueError(f"{what}={named} cannot be honoured: this tokenizer's image recipe is {int(recorded)} px "
                             f"(its codebooks and rectifier were trained on latents of {int(recorded)} px images); "
                             f"leave {what} out, or train a tokenizer on a cache encoded at {named} px")
        return int(recorded)

    @property
    def resolution(self) -> int:
        """The image side the tokenizer's VAE inputs were made at (from its recorded recipe)."""
        return self.image_resolution()

    def images_to_model_input(self, images: Any, value_range: tuple[float, float] | None = None) -> torch.Tensor:
        """What users hold (PIL images, HWC uint8 arrays, uint8 or [-1, 1] tensors) -> (B, 3, R, R) in
        [-1, 1] through the tokenizer's image recipe (pipeline.images.as_model_batch)."""
        return as_model_batch(images, self.resolution, value_range)

    @torch.no_grad()
    def encode(self, images: Any, value_range: tuple[float, float] | None = None) -> torch.Tensor:
        """Images -> token ids (B, T).

        Args:
            images: PIL image(s), HWC uint8 numpy array(s), or tensors (B, 3, R, R) / (3, R, R), uint8
                or float in [-1, 1]; PIL and numpy inputs are resized and centre-cropped with the recipe.
            value_range: the range of float inputs when it is not [-1, 1], e.g. (0, 1).
        """
        vae = self.vae
        return self.latents_to_ids(vae.encode(self.images_to_model_input(images, value_range)))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Token ids (B, T), any integer dtype -> images (B, 3, R, R) float in [-1, 1] (to_uint8 for 8 bits)."""
        vae = self.vae
        return vae.decode(self.ids_to_latents(ids).to(vae.device)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> Reconstructions:
        """Images (B, 3, R, R) in [-1, 1] -> the VAE's and the tokenizer's reconstructions, both 8-bit."""
        vae = self.vae
        z = vae.encode(images)  # (B, C, H, W)
        latents = self.round_trip(z)
        return Reconstructions(original=to_uint8(images), vae=to_uint8(vae.decode(z)),
                               tokenizer=to_uint8(vae.decode(latents.decoder_input.to(vae.device))),
                               latents=latents)

    @property
    def vae(self) -> "FrozenVAE":
        """The frozen VAE, loaded on first use from the given or the recorded source."""
        if self._vae is None:
            from revq_pipe.pipeline.vae import FrozenVAE

            self.attach_vae(FrozenVAE.load(self.vae_source(self._vae_source), device=self.device))
        return self._vae

    def attach_vae(self, vae: "FrozenVAE") -> None:
        """Use `vae` for images; refused unless its weights are the ones the tokenizer was trained with."""
        require_same_vae(self.vae_identity, vae.identity, expected_what="this tokenizer",
                         found_what="the VAE given",
                         fix="pass the VAE the tokenizer was trained with (--vae / vae=...)")
        self._vae = vae

