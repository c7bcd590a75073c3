"""resolve_device: "auto" and explicit choices, with clear errors for devices this machine lacks."""

from __future__ import annotations

import pytest
import torch

from revq_pipe.pipeline.device import resolve_device


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device='cuda:1' was requested but CUDA is not available"):
        resolve_device("cuda:1")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="device='gpu0' is not a device name"):
        resolve_device("gpu0")
