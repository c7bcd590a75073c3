"""Multi-rank plumbing: the sparse codebook exchange, named timeouts, the device of each rank."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from revq_pipe.pipeline.device import deterministic_kernels
from revq_pipe.stages.distributed import DistContext, rank_device
from revq_pipe.stages.train_loop import train_step
from tests._dist_driver import global_problem, parts_for
from tests.helpers_processes import Ranks, one_thread

REPO = Path(__file__).resolve().parents[1]
DRIVER = [sys.executable, str(REPO / "tests" / "_dist_driver.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def single_process_gradient() -> torch.Tensor:
    quantizer, batch = global_problem()
    with one_thread():
        train_step(parts_for(quantizer), batch, SINGLE)
    return quantizer.codebooks.grad


def autograd_gradient() -> torch.Tensor:
    """The codebook gradient of the whole batch's codebook loss through plain autograd (embedding backward)."""
    quantizer, batch = global_problem()
    quantizer(batch).codebook_loss.backward()
    return quantizer.codebooks.grad


@pytest.mark.slow
def test_sparse_codebook_exchange_equals_the_dense_all_reduce_on_2_and_3_ranks(tmp_path):
    jobs = {}
    for world in (2, 3):  # started together, checked together
        (tmp_path / str(world)).mkdir()
        jobs[world] = Ranks([*DRIVER, "sync", str(tmp_path / str(world))], ENV, world, REPO)
    reference = single_process_gradient()
    torch.testing.assert_close(reference, autograd_gradient(), rtol=1e-6, atol=1e-9)
    assert (reference != 0).any() and (reference == 0).any(), "the batch touches some codes and not others"
    for world, job in jobs.items():
        with job:
            done = job.finish()
        assert done.returncode == 0, done.stderr[-3000:]
        for rank in range(world):
            grads = torch.load(tmp_path / str(world) / f"rank{rank}.pt")
            # the same bits on every rank and as one process: the exchange rebuilds the whole batch's sum
            assert torch.equal(grads["sparse"], reference), (world, rank)
            torch.testing.assert_close(grads["sparse"], grads["dense"], rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_a_collective_timeout_names_the_phase_and_the_setting():
    with Ranks([*DRIVER, "timeout"], ENV, 2, REPO) as job:
        done = job.finish(timeout=60)
    rank0 = done.stderr.split("[rank 1]")[0]
    assert done.returncode == 3, done.stderr[-2000:]
    assert "rank 0 of 2 waited more than dist.timeout_minutes=0.05" in rank0
    assert "during phase 'assemble the store'" in rank0


def test_an_explicit_gpu_index_is_honoured_and_a_bare_cuda_takes_the_local_rank():
    cuda = torch.device("cuda")
    assert rank_device(torch.device("cuda", 1), local_rank=0, local_world_size=1, cuda_count=2) == torch.device("cuda", 1)
    assert rank_device(cuda, local_rank=3, local_world_size=4, cuda_count=4) == torch.device("cuda", 3)
    assert rank_device(torch.device("cpu"), local_rank=1, local_world_size=2, cuda_count=0) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device=cuda:1 names one GPU, but 2 processes .* CUDA_VISIBLE_DEVICES"):
        rank_device(torch.device("cuda", 1), local_rank=0, local_world_size=2, cuda_count=2)


def test_deterministic_kernels_are_set_for_the_block_and_restored():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
    with deterministic_kernels(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]


@pytest.mark.parametrize("ties", [False, True])
def test_a_step_with_the_deferred_exactness_check_equals_the_synchronous_step(ties):
    """The accelerator path (no host sync in the search) takes the same step; when its capacity for near ties
    is exceeded (duplicated codes) it repeats the search the synchronous way, and says so."""
    steps = []
    for deferred in (False, True):
        quantizer, batch = global_problem()
        quantizer.search_memory_mb = 0.001  # a capacity of 8 re-decided rows
        if ties:  # codes 3 and 4 repeat codes 0 and 1: every token nearest to them is a tie
            with torch.no_grad():
                quantizer.codebooks[:, 3:] = quantizer.codebooks[:, :2]
        parts = parts_for(quantizer)
        parts.deferred_search = deferred
        train_step(parts, batch, SINGLE)
        steps.append((quantizer.codebooks.detach().clone(), parts.usage.counts.clone(), parts.searches_repeated))
    assert torch.equal(steps[0][0], steps[1][0]) and torch.equal(steps[0][1], steps[1][1])
    assert steps[1][2] == (1 if ties else 0)
