"""What only a CUDA device can show (marked gpu, skipped without one; benchmarks/device_check.sh runs them)."""

from __future__ import annotations

import pytest
import torch

from revq_pipe.cache.loader import LatentSource
from revq_pipe.cache.reader import LatentCache
from revq_pipe.pipeline.precision import job_precision
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.rectifier import build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.pipeline.vae import FrozenVAE
from revq_pipe.stages.distributed import DistContext
from revq_pipe.stages.train_loop import train_step
from tests._dist_driver import global_problem, parts_for
from tests.helpers_cache import build_store
from tests.helpers_vae import make_tiny_vae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_the_search_on_cuda_gives_the_cpus_ids_with_and_without_host_sync():
    generator = torch.Generator().manual_seed(0)
    cpu = MultiGroupQuantizer((32, 8, 8), 512, 4096)
    with torch.no_grad():  # duplicated codes: ties the exact check must settle
        cpu.codebooks[:, 4000:] = cpu.codebooks[:, :96]
    tokens = torch.randn(64, 512, 4, generator=generator)
    expected = cpu.nearest(tokens)
    gpu = MultiGroupQuantizer((32, 8, 8), 512, 4096).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    assert torch.equal(gpu.nearest(tokens.to(CUDA)).cpu(), expected)
    ids, check = gpu.nearest(tokens.to(CUDA), deferred=True)
    if check.holds():
        assert torch.equal(ids.cpu(), expected)


def test_a_deferred_step_on_cuda_equals_the_synchronous_one():
    steps = []
    for deferred in (False, True):
        quantizer, batch = global_problem()
        parts = parts_for(quantizer.to(CUDA))
        parts.normalizer = parts.normalizer.to(CUDA)
        parts.deferred_search = deferred
        train_step(parts, batch.to(CUDA), DistContext(rank=0, world_size=1, local_rank=0, device=CUDA))
        steps.append((quantizer.codebooks.detach().cpu(), parts.usage.counts.cpu()))
    torch.testing.assert_close(steps[0][0], steps[1][0], rtol=1e-6, atol=1e-7)
    assert torch.equal(steps[0][1], steps[1][1])


@pytest.mark.parametrize("policy", ["fp32", "tf32"])
def test_both_rectifier_forward_forms_compute_the_same_function_under_one_policy(policy):
    torch.manual_seed(0)
    rectifier = build_rectifier(RectifierSpec(width=256, depth=2), 32).to(CUDA)
    with torch.no_grad():
        rectifier.conv_out.weight.normal_(0, 0.02)
    x = torch.randn(32, 32, 8, 8, device=CUDA)
    with job_precision(policy):
        rectifier.forward_impl = "channels_last"
        ours = rectifier(x)
        rectifier.forward_impl = "diffusers"
        theirs = rectifier(x)
    scale = theirs.abs().max()
    tolerance = 1e-5 if policy == "fp32" else 5e-3
    assert (ours - theirs).abs().max() <= tolerance * scale


def test_the_vaes_float32_on_cuda_is_ieee_float32(tmp_path):
    folder = make_tiny_vae(tmp_path)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cpu = FrozenVAE.load(str(folder), device="cpu").encode(images)
    gpu = FrozenVAE.load(str(folder), device="cuda").encode(images).cpu()
    assert (gpu - cpu).abs().max() <= 1e-5 * cpu.abs().max()  # TF32 would be ~1e-3


def test_streamed_batches_on_cuda_equal_resident_ones(tmp_path):
    build_store(tmp_path / "s.zarr", 49)
    cache = LatentCache.open(tmp_path / "s.zarr")
    resident = LatentSource(cache, CUDA, "always", shuffle_window=10, shuffle_block=5)
    streamed = LatentSource(cache, CUDA, "never", shuffle_window=10, shuffle_block=5)
    for a, b in zip(resident.epoch_batches(12, seed=0, epoch=1), streamed.epoch_batches(12, seed=0, epoch=1)):
        assert a.is_cuda and b.is_cuda and torch.equal(a, b)
