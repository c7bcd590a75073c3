"""What rectifier to build: plain data, importable without torch or diffusers (the config loader uses it).

`RectifierSpec.check` is the one validation of a spec: the config loader asks it when it reads the
settings, and the rectifier asks it (with the latent channels) when it builds.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("vit", "none")
# How the EfficientViT blocks are evaluated (the same function and parameters either way):
# "channels_last" is our re-layout of diffusers' forward, written for the CPU (docs/cli.md, "Rectifier forward",
# gives its measurements, which differ between runs, and the benchmark); "diffusers" is diffusers' own forward, the one
# torch.compile and CUDA kernels are tuned for; "auto" takes channels_last on the CPU and diffusers'
# forward on other devices until a GPU measurement says otherwise.
FORWARDS = ("auto", "channels_last", "diffusers")


@dataclass
class RectifierSpec:
    """What to build. kind "vit" is the EfficientViT rectifier; "none" is the identity (no parameters).

    The defaults are the embedded demo's rectifier (the built-in config is the demo); the ImageNet
    presets set the paper's sizes.

    Args:
        kind: one of KINDS.
        width: W, channels inside the rectifier; a multiple of head_dim and of the latent channels.
        depth: L, EfficientViT blocks (0: the two 3x3 convs alone).
        head_dim: channels per attention head.
        residual: add the input to the output (the rectifier starts as the identity).
        forward: how the blocks are evaluated, one of FORWARDS.
    """

    kind: str = "vit"
    width: int = 128
    depth: int = 1
    head_dim: int = 32
    residual: bool = True
    forward: str = "auto"

    def check(self, latent_channels: int | None = None) -> "RectifierSpec":
        """Return the spec, or raise ValueError naming the first setting that cannot be built (and its fix)."""
        if self.kind not in KINDS:
            raise ValueError(f"rectifier.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.forward not in FORWARDS:
            raise ValueError(f"rectifier.forward={self.forward!r} is not one of {', '.join(FORWARDS)}")
        if self.kind == "none":
            return self
        for name, value, least in (("width", self.width, 1), ("head_dim", self.head_dim, 1), ("depth", self.depth, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"rectifier.{name}={value!r} must be an integer >= {least}")
        if self.width % self.head_dim:
            raise ValueError(f"rectifier.width={self.width} is not a multiple of rectifier.head_dim={self.head_dim}")
        if latent_channels is not None and latent_channels < 1:
            raise ValueError(f"latent_channels={latent_channels}: a latent has at least one channel")
        if latent_channels is not None and self.width % latent_channels:
            raise ValueError(f"rectifier.width={self.width} is not a multiple of the {latent_channels} latent channels "
                             "(the stem's shortcut repeats each channel width/channels times); choose a multiple")
        return self
