"""What rectifier to build: plain data, importable without torch or diffusers (the config loader uses it)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("vit", "none")
# How the EfficientViT blocks are evaluated (the same function and parameters either way):
# "channels_last" is our re-layout of diffusers' forward, 1.1-1.2x faster on CPU (measured in
# benchmarks/bench_train_step.py); "diffusers" is diffusers' own forward, the one torch.compile and
# CUDA kernels are tuned for; "auto" takes channels_last on the CPU and diffusers' forward on other
# devices until a GPU measurement says otherwise (README, "Rectifier forward").
FORWARDS = ("auto", "channels_last", "diffusers")


@dataclass
class RectifierSpec:
    """What to build. kind "vit" is the EfficientViT rectifier; "none" is the identity (no parameters)."""

    kind: str = "vit"
    width: int = 512
    depth: int = 3
    head_dim: int = 32
    residual: bool = True
    forward: str = "auto"

