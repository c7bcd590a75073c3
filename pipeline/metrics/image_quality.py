"""Per-image PSNR (RGB and luma) and SSIM (luma) on 8-bit images, in float64.

All functions take two uint8 batches (B, 3, H, W) on any device and return one value per image,
float64 (B,); the caller averages over images. Identical images have infinite PSNR.

Luma convention (the one super-resolution papers and BasicSR use, MATLAB's rgb2ycbcr):
ITU-R BT.601 studio swing, Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B the
8-bit values, so Y lies in [16, 235]. Y is not rounded, and PSNR-Y and SSIM use a data range
(peak) of 255.

SSIM: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population (co)variances, mean
over the window positions that fit inside the image ("valid"). This equals scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255)`, which filters with reflected borders but averages only pixels at least 5 away
from every border, where no reflected value enters the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_LUMA_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601 for R, G, B in [0, 1], output scale 0..255


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype} and {b.dtype} (round to 8 bits first)")
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"expected two (B, 3, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(PEAK**2 / mse)  # inf where mse == 0


def rgb_to_luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float64 BT.601 luma (B, H, W) in [16, 235]."""
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    return 16.0 + (images.double() * weights).sum(dim=1) / 255.0


def psnr_rgb(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR over all RGB values of each image, peak 255: (B,) float64."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3))
    return _psnr_from_mse(mse)


def psnr_y(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR of the BT.601 luma of each image, peak 255: (B,) float64."""
    _check_pair(a, b)
    mse = (rgb_to_luma(a) - rgb_to_luma(b)).pow(2).mean(dim=(1, 2))
    return _psnr_from_mse(mse)


def _gaussian_taps(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()  # (11,)


def ssim_gray(x: torch.Tensor, y: torch.Tensor, data_range: float = PEAK) -> torch.Tensor:
    """Mean SSIM of single-channel images (B, H, W), float64 (B,); H and W must be >= 11."""
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"expected two (B, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    batch, height, width = x.shape
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    x, y = x.double(), y.double()
    taps = _gaussian_taps(x.device)
    moments = torch.stack([x, y, x * x, y * y, x * y], dim=1).view(batch * 5, 1, height, width)
    # Separable Gaussian, valid positions only.
    moments = F.conv2d(moments, taps.view(1, 1, -1, 1))
    moments = F.conv2d(moments, taps.view(1, 1, 1, -1))
    mx, my, mxx, myy, mxy = moments.view(batch, 5, height - SSIM_WINDOW + 1, width - SSIM_WINDOW + 1).unbind(1)
    var_x, var_y, cov_xy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cov_xy + c2)) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of the BT.601 luma of each image (data range 255): (B,) float64."""
    _check_pair(a, b)
    return ssim_gray(rgb_to_luma(a), rgb_to_luma(b), data_range=PEAK)
