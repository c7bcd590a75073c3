"""One precision policy for a job: which float32 kernels may use TF32, and what runs under bf16 autocast.

    fp32  IEEE float32 everywhere: no TF32 in CUDA matmuls or cuDNN convolutions (the paper's setting)
    tf32  float32 tensors, TF32 tensor-core math in CUDA matmuls and cuDNN convolutions alike
    bf16  the rectifier under bfloat16 autocast (every forward form); everything else IEEE float32

PyTorch's own defaults differ between the two kinds of kernel (cuDNN convolutions may use TF32, CUDA
matmuls may not), which makes two formulations of the same function, a 1x1 convolution and a matmul,
compute different numbers; a policy always sets both. The exact nearest-code search runs in IEEE float32
whatever the policy (`ieee_float32`). Everything here uses PyTorch's per-backend `fp32_precision`
settings, never the legacy `allow_tf32` / `set_float32_matmul_precision` ones: PyTorch refuses to read
the precision once both kinds have been used in one process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from revq_pipe.pipeline.choices import PRECISIONS


@contextlib.contextmanager
def float32_math(mode: str) -> Iterator[None]:
    """Run the block with CUDA float32 matmuls and cuDNN convolutions in `mode` ("ieee" or "tf32"), and
    oneDNN's (CPU) float32 kernels in IEEE float32, then restore the previous settings."""
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"float32 math mode {mode!r} is not 'ieee' or 'tf32'")
    backends = torch.backends
    wanted = [(backends.cuda.matmul, mode), (backends.cudnn.conv, mode),
              (backends.mkldnn.matmul, "ieee"), (backends.mkldnn.conv, "ieee")]
    previous = [(setting, setting.fp32_precision) for setting, _ in wanted]
    try:
        for setting, value in wanted:
            setting.fp32_precision = value
        yield
    finally:
        for setting, value in previous:
            setting.fp32_precision = value


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """IEEE float32 and no autocast: what the exact search's error bound assumes."""
    with float32_math("ieee"), torch.autocast(device.type, enabled=False):
        yield


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not one of {', '.join(PRECISIONS)}")
    return name


def job_precision(name: str) -> contextlib.AbstractContextManager:
    """The float32 math of a job run under policy `name` (for the span of the job)."""
    return float32_math("tf32" if check_precision(name) == "tf32" else "ieee")


def rectifier_autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast around the rectifier under policy "bf16"; nothing otherwise."""
    if check_precision(name) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def describe(name: str, autocast_scope: str) -> dict[str, str]:
    """What policy `name` means, as a tokenizer's provenance and an evaluation report record it;
    `autocast_scope` names what bf16 autocasts ("the rectifier", "the VAE")."""
    check_precision(name)
    return {"policy": name, "float32_math": "tf32" if name == "tf32" else "ieee",
            "bfloat16_autocast": autocast_scope if name == "bf16" else "none"}
