"""What rectifier to build: plain data, importable without torch or diffusers (the config loader uses it)."""

from __future__ import annotations

from dataclasses import dataclass

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
