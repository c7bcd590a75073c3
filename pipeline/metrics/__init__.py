"""Image metrics: FID / Inception Score (FID InceptionV3), LPIPS-Alex, PSNR and SSIM.

Networks are written here in plain torch and load local weights files only; a metric whose
weights were not supplied is reported unavailable with a reason (see `try_load_*`).
"""

from .fid import FeatureStats, FidEvaluator, FidResult, InceptionScoreStats, fid_from_stats, frechet_distance
from .image_quality import psnr_rgb, psnr_y, rgb_to_luma, ssim, ssim_gray
from .inception import (
    FID_WEIGHTS_ENV,
    FIDInceptionV3,
    InceptionOutput,
    load_fid_inception,
    resolve_weights_path,
    try_load_fid_inception,
)
from .lpips import LPIPS, LPIPS_WEIGHTS_ENV, load_lpips, try_load_lpips

__all__ = [
    "FID_WEIGHTS_ENV", "LPIPS_WEIGHTS_ENV", "FIDInceptionV3", "InceptionOutput", "FeatureStats",
    "InceptionScoreStats", "FidEvaluator", "FidResult", "LPIPS", "fid_from_stats",
    "frechet_distance", "load_fid_inception", "load_lpips", "psnr_rgb", "psnr_y", "resolve_weights_path",
    "rgb_to_luma", "ssim", "ssim_gray", "try_load_fid_inception", "try_load_lpips",
]
