"""Per-element standardization of VAE latents with the training cache's population statistics."""

from __future__ import annotations

import torch
from torch import nn

MIN_STD = 1e-6  # floor for the std of an element that never varies in the cache (a constant latent element)


class LatentNormalizer(nn.Module):
    """z' = (z - mean) / std per element, and back.

    Args:
        mean: (C, H, W) population mean of the training latents.
        std: (C, H, W) population standard deviation. Entries below MIN_STD (an element that is constant
            over the cache, std == 0) are raised to MIN_STD, so such an element standardizes to ~0 instead
            of NaN; the stored buffer holds the floored value, i.e. what normalize divides by. Negative or
            non-finite statistics are corrupt and raise ValueError.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape:
            raise ValueError(f"mean has shape {tuple(mean.shape)} but std has shape {tuple(std.shape)}; "
                             "both must be the latent shape (C, H, W)")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("the latent statistics contain NaN or infinite values; re-encode or re-import the "
                             "cache (its latents are probably corrupt)")
        if (std < 0).any():
            raise ValueError(f"std has {int((std < 0).sum())} negative entries; it must be a standard deviation")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clamp_min(MIN_STD))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, H, W) -> standardized latents."""
        return (z - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardized latents (B, C, H, W) -> raw VAE latents."""
        return z * self.std + self.mean
