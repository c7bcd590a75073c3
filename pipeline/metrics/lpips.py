"""LPIPS (v0.1, AlexNet trunk) in plain torch, loading local weights only.

Distance = sum over the five ReLU taps of the spatial mean of a learned 1x1 projection of the
squared difference of channel-normalised features (Zhang et al. 2018, the `lpips` package).
Module names match `lpips.LPIPS(net="alex").state_dict()` (`net.slice1.0.weight`,
`lin0.model.1.weight`, ...), so both a saved LPIPS state_dict and the two original files
(torchvision's AlexNet + lpips' linear heads) load strictly.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from revq_pipe.pipeline.files import file_sha256
from revq_pipe.pipeline.metrics.inception import resolve_weights_path
from revq_pipe.pipeline.precision import ieee_float32

LPIPS_WEIGHTS_ENV = "REVQ_LPIPS_WEIGHTS"
ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
LINEAR_FILENAME = "alex.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILENAME
LINEAR_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/" + LINEAR_FILENAME
LPIPS_WEIGHTS_HELP = (
    f"put torchvision's AlexNet ({ALEXNET_URL}) and lpips' v0.1 linear heads ({LINEAR_URL}) in one "
    f"directory, or save lpips.LPIPS(net='alex').state_dict() to a file, and pass it with "
    f"--lpips-weights or the {LPIPS_WEIGHTS_ENV} environment variable"
)
CHANNELS = (64, 192, 384, 256, 256)  # relu1..relu5
# lpips' ScalingLayer constants: ImageNet mean and std expressed in [-1, 1] units.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Index in torchvision's `alexnet.features` of each conv, and the LPIPS slice that holds it.
_CONV_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


class LinearHead(nn.Module):
    """1x1 conv to one channel without bias. Index 0 is lpips' dropout slot (inactive at eval),
    kept as Identity so the conv sits at `model.1` like in the weights files."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _alexnet_slices() -> nn.Module:
    """AlexNet's conv trunk cut after each ReLU; child names are torchvision's feature indices."""
    pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
    net = nn.Module()
    net.slice1 = nn.Sequential(OrderedDict([("0", nn.Conv2d(3, 64, 11, stride=4, padding=2)), ("1", nn.ReLU())]))
    net.slice2 = nn.Sequential(OrderedDict([("2", pool()), ("3", nn.Conv2d(64, 192, 5, padding=2)), ("4", nn.ReLU())]))
    net.slice3 = nn.Sequential(OrderedDict([("5", pool()), ("6", nn.Conv2d(192, 384, 3, padding=1)), ("7", nn.ReLU())]))
    net.slice4 = nn.Sequential(OrderedDict([("8", nn.Conv2d(384, 256, 3, padding=1)), ("9", nn.ReLU())]))
    net.slice5 = nn.Sequential(OrderedDict([("10", nn.Conv2d(256, 256, 3, padding=1)), ("11", nn.ReLU())]))
    return net


class LPIPS(nn.Module):
    """LPIPS-Alex distance between image batches: (B, 3, H, W) x 2 -> (B,).

    Inputs are float in [-1, 1] or uint8 (mapped to [-1, 1]). Built with random weights; use
    `load_lpips` for the real ones. Always in eval mode without gradients.
    """

    def __init__(self):
        super().__init__()
        # Constants, not weights: left out of the state_dict.
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = _alexnet_slices()
        for k, channels in enumerate(CHANNELS):
            setattr(self, f"lin{k}", LinearHead(channels))
        self.weights_path: str | None = None
        self.weights_sha256: dict[str, str] | None = None  # file name -> sha256
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for k in range(1, 6):
            x = getattr(self.net, f"slice{k}")(x)
            taps.append(x)
        return taps

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
            )
        device = self.shift.device
        a, b = (_to_signed_unit(x).to(device) for x in (a, b))
        with ieee_float32(device):  # IEEE float32 whatever the caller's autocast or TF32 setting
            return self._distance(a, b)

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        taps_a = self._taps((a - self.shift) / self.scale)
        taps_b = self._taps((b - self.shift) / self.scale)
        distance = torch.zeros(a.shape[0], device=a.device)
        for k, (fa, fb) in enumerate(zip(taps_a, taps_b)):
            diff = (_unit_channels(fa) - _unit_channels(fb)) ** 2  # (B, C_k, H_k, W_k)
            distance += getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))
        return distance


def _to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]; float is taken as already in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each pixel's feature vector by its L2 norm (lpips.normalize_tensor)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or pickled files
        raise ValueError(f"cannot read LPIPS weights {path} ({error}): {LPIPS_WEIGHTS_HELP}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict: {LPIPS_WEIGHTS_HELP}")
    return state


def _from_lpips_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Our state_dict from a full `lpips.LPIPS(net='alex')` one (drops its constants and aliases)."""
    constants = {"scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}
    ours = {}
    for key, value in state.items():
        if key in constants:
            if not torch.allclose(value.float().flatten(), torch.tensor(constants[key])):
                raise ValueError(f"{path}: {key} = {value.flatten().tolist()} is not LPIPS' constant")
        elif key.startswith("lins."):  # newer lpips also registers the heads as a ModuleList
            _, index, rest = key.split(".", 2)
            ours.setdefault(f"lin{index}.{rest}", value)
        else:
            ours[key] = value
    return ours


def _from_original_files(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our state_dict from torchvision's AlexNet file and lpips' v0.1 `alex.pth` in `directory`."""
    missing = [name for name in (ALEXNET_FILENAME, LINEAR_FILENAME) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"LPIPS weights directory {directory} lacks {', '.join(missing)}: {LPIPS_WEIGHTS_HELP}")
    alexnet = _load_state(directory / ALEXNET_FILENAME)
    ours = {}
    for index, slice_number in _CONV_SLICE.items():
        for kind in ("weight", "bias"):
            key = f"features.{index}.{kind}"
            if key not in alexnet:
                raise ValueError(f"{directory / ALEXNET_FILENAME} has no {key}: is it torchvision's AlexNet?")
            ours[f"net.slice{slice_number}.{index}.{kind}"] = alexnet[key]
    ours.update(_load_state(directory / LINEAR_FILENAME))
    hashes = {name: file_sha256(directory / name) for name in (ALEXNET_FILENAME, LINEAR_FILENAME)}
    return ours, hashes


def load_lpips(path: str | os.PathLike, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS-Alex from a saved LPIPS state_dict file, or a directory holding
    `alexnet-owt-7be5be79.pth` and `alex.pth`; records the path and the files' sha256."""
    path = Path(path).expanduser()
    if path.is_dir():
        state, hashes = _from_original_files(path)
    elif path.is_file():
        state, hashes = _from_lpips_state(_load_state(path), path), {path.name: file_sha256(path)}
    else:
        raise FileNotFoundError(f"LPIPS weights not found at {path}: {LPIPS_WEIGHTS_HELP}")
    model = LPIPS()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not hold LPIPS-Alex v0.1 weights: {error}") from error
    model.weights_path = str(path)
    model.weights_sha256 = hashes
    return model.to(device)


def try_load_lpips(
    explicit: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[LPIPS | None, str | None]:
    """(model, None) when weights were supplied, (None, reason) when none were.

    Weights that were supplied but are missing or wrong raise: a typo is an error, not a skipped metric.
    """
    path = resolve_weights_path(explicit, LPIPS_WEIGHTS_ENV)
    if path is None:
        return None, f"no LPIPS weights given: {LPIPS_WEIGHTS_HELP}"
    return load_lpips(path, device), None
