"""The rectifier (METHOD.md): a small EfficientViT network at latent resolution that removes most of the
quantization error, (B, C, H, W) -> (B, C, H, W) in the standardized latent space.

    x -> conv3x3 C->W  (+ x repeated along channels, W/C times each)   # stem with channel-repeat shortcut
      -> L x EfficientViTBlock(W, head dim, multiscale (5,), RMSNorm)  # diffusers' DC-AE block
      -> RMSNorm (channel-wise) -> ReLU -> conv3x3 W->C                 # head
    residual=True: output = x + head(...), with the last conv zero-initialised (starts as the identity);
    residual=False: output = head(...), the reference's plain form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock
from diffusers.models.normalization import RMSNorm
from torch import nn

KINDS = ("vit", "none")


@dataclass
class RectifierSpec:
    """What to build. kind "vit" is the EfficientViT rectifier; "none" is the identity (no parameters)."""

    kind: str = "vit"
    width: int = 512
    depth: int = 3
    head_dim: int = 32
    residual: bool = True


# METHOD.md's presets (32 latent channels): rectifier parameters 14.07 M, 72.97 M and 18.66 M
PRESETS = {
    "512T": RectifierSpec(kind="vit", width=512, depth=3, head_dim=32),
    "256T-B": RectifierSpec(kind="vit", width=1024, depth=4, head_dim=32),
    "256T-L": RectifierSpec(kind="vit", width=512, depth=4, head_dim=32),
}


class EfficientViTRectifier(nn.Module):
    """EfficientViT-block rectifier.

    Args:
        channels: C, the latent channels.
        width: W, the working channels; a multiple of C (the stem's shortcut repeats each channel W/C
            times) and of head_dim.
        depth: L, the number of EfficientViT blocks.
        head_dim: attention head dimension of the blocks' multiscale linear attention.
        residual: add the input to the output and zero-initialise the last conv, so that the module
            starts as the exact identity.
    """

    def __init__(self, channels: int, width: int, depth: int, head_dim: int = 32, residual: bool = True) -> None:
        super().__init__()
        if channels < 1 or width < 1 or depth < 0 or head_dim < 1:
            raise ValueError(f"rectifier sizes must be positive: channels={channels}, width={width}, "
                             f"depth={depth}, head_dim={head_dim}")
        if width % channels:
            raise ValueError(f"rectifier width={width} is not a multiple of the {channels} latent channels "
                             "(the stem's shortcut repeats each channel width/channels times); choose a multiple")
        if width % head_dim:
            raise ValueError(f"rectifier width={width} is not a multiple of head_dim={head_dim}")
        self.residual = residual
        self.repeats = width // channels
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            EfficientViTBlock(width, attention_head_dim=head_dim, qkv_multiscales=(5,), norm_type="rms_norm")
            for _ in range(depth))
        self.norm_out = RMSNorm(width, eps=1e-5, elementwise_affine=True, bias=True)
        self.act_out = nn.ReLU()
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        if residual:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + x.repeat_interleave(self.repeats, dim=1)  # (B, W, H, W)
        for block in self.blocks:
            h = block(h)
        h = self.norm_out(h.movedim(1, -1)).movedim(-1, 1)  # RMSNorm over channels
        h = self.conv_out(self.act_out(h))  # (B, C, H, W)
        return x + h if self.residual else h


def build_rectifier(spec: RectifierSpec, latent_channels: int) -> nn.Module:
    """The rectifier `spec` describes for latents with `latent_channels` channels."""
    if spec.kind == "none":
        return nn.Identity()
    if spec.kind == "vit":
        return EfficientViTRectifier(latent_channels, spec.width, spec.depth, spec.head_dim, spec.residual)
    raise ValueError(f"rectifier kind={spec.kind!r} is not one of {', '.join(map(repr, KINDS))}")
