"""Pick the torch device a job runs on from a user setting ("auto", "cpu", "cuda", "cuda:1", "mps")."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible matmuls (CUDA docs)


def resolve_device(preference: str | torch.device = "auto") -> torch.device:
    """"auto" -> the first CUDA device when one is available, else the CPU; anything else is checked.

    Raises ValueError naming the setting when the requested device does not exist on this machine.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    text = preference.strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"device={preference!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' "
                         "or 'mps'") from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={preference!r} was requested but CUDA is not available here (torch "
                             f"{torch.__version__}); use device=auto or device=cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={preference!r} was requested but only {count} CUDA device(s) exist "
                             f"(cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={preference!r} was requested but MPS is not available here; "
                             "use device=auto or device=cpu")
        return device
    raise ValueError(f"device={preference!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """With `enabled`, run the block with deterministic kernels: torch's deterministic algorithms (a
    warning, not an error, for an op that has none), cuDNN deterministic and not benchmarking, and the
    cuBLAS workspace setting it needs (read when cuBLAS starts, so enter this before any CUDA work).
    Restores the previous settings afterwards. Without it, training is still exactly resumable on
    the CPU; on CUDA some kernels (atomics in backward passes) may differ in their last bits run to run.
    """
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
        if previous[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
