"""resolve_device: what it accepts and what it refuses, with which message, on machines with and without CUDA.

CUDA and MPS are simulated by patching torch's availability checks, so every case runs on any machine.
"""

from __future__ import annotations

import pytest
import torch

from revq_pipe.pipeline.device import resolve_device


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_takes_the_cpu_without_cuda_and_every_spelling_of_cpu_is_the_cpu(no_accelerator):
    assert resolve_device("auto") == resolve_device() == torch.device("cpu")
    assert resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_takes_the_first_cuda_device_and_any_existing_index_is_accepted(two_cuda_devices):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # the CPU stays choosable


def test_a_cuda_index_beyond_the_devices_names_the_ones_that_exist(two_cuda_devices):
    with pytest.raises(ValueError, match=r"device='cuda:2' was requested but only 2 CUDA device\(s\) exist "
                                         r"\(cuda:0\.\.cuda:1\)"):
        resolve_device("cuda:2")


def test_an_accelerator_this_machine_lacks_is_refused_with_the_fix(no_accelerator):
    with pytest.raises(ValueError, match="device='cuda:1' was requested but CUDA is not available here .*"
                                         "use device=auto or device=cpu"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device='mps' was requested but MPS is not available here; use device=auto"):
        resolve_device("mps")


@pytest.mark.parametrize("name, message", [("gpu0", "is not a device name"), ("meta", "is not supported")])
def test_a_name_that_is_no_device_or_no_device_to_run_on_lists_the_choices(name, message):
    with pytest.raises(ValueError, match=f"device='{name}' {message}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        resolve_device(name)
