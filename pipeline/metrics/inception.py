"""The InceptionV3 network that FID and the Inception Score are defined with, in plain torch.

This is the "FID Inception": the TensorFlow graph `inception-2015-12-05` ported to PyTorch by
pytorch-fid (weights file `pt_inception-2015-12-05-6726825d.pth`; torch-fidelity ships the same
tensors under the same key names). It differs from torchvision's ImageNet InceptionV3 in a
1008-way classifier, average pools that ignore padded zeros (TensorFlow semantics) and a max pool
in the last block's pool branch. Module names match the weights file, so a plain strict
`load_state_dict` works. The architecture facts follow pytorch-fid's `src/pytorch_fid/inception.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from revq_pipe.pipeline.files import file_sha256
from revq_pipe.pipeline.precision import ieee_float32

FID_WEIGHTS_ENV = "REVQ_FID_WEIGHTS"
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
FID_WEIGHTS_HELP = (
    f"download {FID_WEIGHTS_URL} (pytorch-fid's release of the standard FID InceptionV3 weights) "
    f"and pass its path with --fid-weights or the {FID_WEIGHTS_ENV} environment variable"
)
INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048


@dataclass
class InceptionOutput:
    """What a feature network gives the FID/IS accumulators."""

    features: torch.Tensor  # (B, 2048) float32, final average pool
    logits: torch.Tensor | None  # (B, 1008) float32, pool @ fc.weight.T (no bias), for IS


class BasicConv2d(nn.Module):
    """Conv without bias, BatchNorm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], dim=1)  # (B, 224 + pool_features, H, W)


class ReductionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, bp], dim=1)  # (B, 480 + in_channels, H', W')


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b/c/d/e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), b7, bd, bp], dim=1)  # (B, 768, 17, 17)


class ReductionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)  # (B, 512 + in_channels, 8, 8)


class MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 branches (Mixed_7b, and Mixed_7c with max_pool=True).

    The FID graph pools with max instead of average in Mixed_7c's pool branch; pytorch-fid keeps
    that quirk and so do we, otherwise the features are not the standard ones.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], dim=1)  # (B, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """FID InceptionV3: uint8 images (B, 3, H, W) -> 2048-d pool features and 1008 IS logits.

    Preprocessing follows pytorch-fid: pixels to [0, 1], bilinear resize to 299x299
    (align_corners=False, no antialiasing), then to [-1, 1]. Built with random weights; use
    `load_fid_inception` for the real ones. Always in eval mode without gradients.
    """

    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        # BatchNorm must keep using the stored statistics: this network is never trained.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutput:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FIDInceptionV3 expects uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.to(self.fc.weight.device, torch.float32) / 255.0
        with ieee_float32(x.device):  # the standard features are IEEE float32: no autocast, no TF32
            return self._features_and_logits(x)

    def _features_and_logits(self, x: torch.Tensor) -> InceptionOutput:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0  # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends at (B, 2048, 8, 8)
        features = x.mean(dim=(2, 3))  # (B, 2048)
        # The original Inception Score code (and torch-fidelity) uses the logits without the bias.
        logits = features @ self.fc.weight.T  # (B, 1008)
        return InceptionOutput(features=features, logits=logits)


def resolve_weights_path(explicit: str | os.PathLike | None, env_var: str) -> Path | None:
    """The weights path to use: `explicit` if given (non-empty), else `$env_var` if set, else None."""
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(env_var, "")
    return Path(from_env).expanduser() if from_env else None


def load_fid_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build FIDInceptionV3 with the weights in `path` (strict); records the path and sha256."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {path}: {FID_WEIGHTS_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or pickled files
        raise ValueError(f"cannot read FID Inception weights {path} ({error}): {FID_WEIGHTS_HELP}") from error
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is not the FID InceptionV3 state_dict ({FID_WEIGHTS_FILENAME}): {error}"
        ) from error
    model.weights_path = str(path)
    model.weights_sha256 = file_sha256(path)
    return model.to(device)


def try_load_fid_inception(
    explicit: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[FIDInceptionV3 | None, str | None]:
    """(model, None) when weights were supplied, (None, reason) when none were.

    Weights that were supplied but are missing or wrong raise: a typo is an error, not a skipped metric.
    """
    path = resolve_weights_path(explicit, FID_WEIGHTS_ENV)
    if path is None:
        return None, f"no FID Inception weights given: {FID_WEIGHTS_HELP}"
    return load_fid_inception(path, device), None
