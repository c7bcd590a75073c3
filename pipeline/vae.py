"""The frozen pre-trained image VAE: diffusers AutoencoderDC or AutoencoderKL, never trained here.

Latents are returned exactly as the encoder produces them (KL: the posterior mode); the
`scaling_factor` / `shift_factor` of the model config are never applied, because the
tokenizer standardizes latents with statistics of its own cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import re
from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL

from revq_pipe.pipeline.device import resolve_device
from revq_pipe.pipeline.hub import hub_unreachable_reason, quiet_hub
from revq_pipe.pipeline.precision import check_precision, job_precision

VAE_CLASSES = {"AutoencoderDC": AutoencoderDC, "AutoencoderKL": AutoencoderKL}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXAMPLE_DOWNLOAD = ("huggingface-cli download mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers "
                     "--local-dir models/dc-ae-f32c32 and pass --vae models/dc-ae-f32c32")


class FrozenVAE:
    """A pre-trained VAE in eval mode with gradients off; create it with `FrozenVAE.load`.

    Args:
        model: the diffusers autoencoder.
        source: the local folder or hub id it was loaded from (recorded in caches).
        device: where it runs.
        precision: the math of encode/decode, a pipeline/precision.py policy: "fp32" (IEEE float32, the
            evaluation protocol's), "tf32", or "bf16" (the whole autoencoder under bfloat16 autocast).
    """

    def __init__(self, model: AutoencoderDC | AutoencoderKL, source: str, device: torch.device,
                 precision: str = "fp32") -> None:
        self.model = model.eval().requires_grad_(False)
        self.source = source
        self.device = device
        self.precision = check_precision(precision)
        self.class_name = type(model).__name__
        self._weights_sha256 = _weights_sha256(model)  # before moving it, so the hash never depends on the device
        self.model.to(device)

    @classmethod
    def load(cls, source: str, device: str | torch.device = "auto", precision: str = "fp32") -> "FrozenVAE":
        """Load from a local folder (a VAE folder or a pipeline folder with vae/) or a hub id.

        A local folder is recorded as its absolute, resolved path, so caches and tokenizers made with
        it work from any directory; a hub id is recorded as it is.
        """
        device = device if isinstance(device, torch.device) else resolve_device(device)
        resolved = resolve_vae_source(source)
        model = _load_hub(resolved) if is_hub_id(resolved) else _load_local(Path(resolved))
        return cls(model, source=resolved, device=device, precision=precision)

    @property
    def identity(self) -> dict:
        """What a cache records about its encoder: {source, class, weights_sha256}."""
        return {"source": self.source, "class": self.class_name, "weights_sha256": self._weights_sha256}

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def spatial_compression(self) -> int:
        """Downsampling factor from image side to latent side."""
        config = self.model.config
        blocks = config.encoder_block_out_channels if self.class_name == "AutoencoderDC" else config.block_out_channels
        return 2 ** (len(blocks) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent of an R x R image; ValueError if R does not fit the VAE."""
        f = self.spatial_compression
        if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < f \
                or resolution % f:
            nearest = max(f, round(resolution / f) * f) if isinstance(resolution, numbers.Real) else f
            raise ValueError(
                f"resolution {resolution} does not fit the VAE {self.source} ({self.class_name} downsamples by {f}); "
                f"use a positive multiple of {f}, e.g. --resolution {nearest}")
        side = int(resolution) // f
        return (self.latent_channels, side, side)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> float32 latents (B, C, R/f, R/f) on the VAE's device."""
        x = images.to(self.device, torch.float32)
        with self._math():
            if self.class_name == "AutoencoderKL":
                latents = self.model.encode(x).latent_dist.mode()
            else:
                latents = self.model.encode(x).latent
        return latents.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> float32 images (B, 3, R, R), roughly in [-1, 1] (not clamped)."""
        z = latents.to(self.device, torch.float32)
        with self._math():
            images = self.model.decode(z).sample
        return images.float()

    @contextlib.contextmanager
    def _math(self):
        with job_precision(self.precision):
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield


def is_hub_id(source: str) -> bool:
    """"org/name" that is not a path (no leading ./, / or ~) and whose "org" is no local folder."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists() and not Path(source).parent.is_dir()


def resolve_vae_source(source: str) -> str:
    """A hub id as it is, or an existing local folder as its absolute path; a local path that does not
    exist is a FileNotFoundError at once (never sent to the hub)."""
    if not source:
        raise ValueError("no VAE was named; pass --vae with a local diffusers VAE folder or a hub id")
    if is_hub_id(source):
        return source
    folder = Path(source).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"VAE folder {source} does not exist (resolved from {Path.cwd()}: {folder.resolve()}); pass --vae with "
            f"a local diffusers VAE folder (holding config.json and the weights) or a hub id. To get DC-AE: "
            f"{_EXAMPLE_DOWNLOAD}")
    return str(folder.resolve())


def _load_local(folder: Path) -> AutoencoderDC | AutoencoderKL:
    """Load from a VAE folder, or from the vae/ subfolder of a diffusers pipeline folder."""
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} holds no config.json, so it is not a diffusers VAE folder; point --vae at the folder "
            f"written by save_pretrained or downloaded from the hub, e.g. {_EXAMPLE_DOWNLOAD}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); download the VAE again") from None
    model_class = _vae_class(config, str(folder))
    try:
        return model_class.from_pretrained(folder, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ValueError(f"cannot load the {model_class.__name__} in {folder}: {error}; the folder is incomplete "
                         f"or damaged, download it again ({_EXAMPLE_DOWNLOAD})") from None


def _load_hub(repo_id: str) -> AutoencoderDC | AutoencoderKL:
    """Load a hub id: from the local hub cache if it is there, else download (one config fetch first)."""
    config, error = None, None
    for local_files_only in (True, False):
        if not local_files_only and (offline := hub_unreachable_reason()):
            error = ConnectionError(offline)  # fail now instead of after huggingface_hub's retries
            break
        try:
            with quiet_hub():
                config = AutoencoderDC.load_config(repo_id, local_files_only=local_files_only)
            break
        except Exception as failure:  # hub and network errors come in many types; all mean "not loadable"
            error = failure
    if config is None:
        raise FileNotFoundError(
            f"VAE {repo_id!r} is no local folder (none at {Path(repo_id).resolve()}) and cannot be loaded from the "
            f"Hugging Face hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}). Without network, "
            f"download it elsewhere with `huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here and "
            "pass --vae DIR")
    model_class = _vae_class(dict(config), repo_id)
    with quiet_hub():
        return model_class.from_pretrained(repo_id, low_cpu_mem_usage=False, local_files_only=local_files_only)


def _vae_class(config: dict, where: str) -> type:
    """The autoencoder class named by a config's `_class_name` (inferred from its keys if absent)."""
    name = config.get("_class_name")
    if name is None:
        name = "AutoencoderDC" if "encoder_block_out_channels" in config else "AutoencoderKL"
    if name not in VAE_CLASSES:
        raise ValueError(f"{where} holds a {name}, not a VAE this project supports ({', '.join(VAE_CLASSES)})")
    return VAE_CLASSES[name]


def _weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every state_dict tensor in sorted key order: name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
