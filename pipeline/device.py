"""Pick the torch device a job runs on from a user setting ("auto", "cpu", "cuda", "cuda:1", "mps")."""

from __future__ import annotations

import torch


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
