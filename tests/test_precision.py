"""One precision policy: TF32 for CUDA matmuls and cuDNN convolutions alike, IEEE float32 where exactness or a
protocol needs it, and what a run used recorded with its results."""

from __future__ import annotations

import pytest
import torch

from revq_pipe.pipeline.precision import float32_math, job_precision, rectifier_autocast
from revq_pipe.pipeline.quantizer import MultiGroupQuantizer
from revq_pipe.pipeline.vae import FrozenVAE
from tests.helpers_vae import make_tiny_vae

BACKENDS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)


def settings() -> tuple[str, str]:
    return tuple(b.fp32_precision for b in BACKENDS)


@pytest.mark.parametrize("policy,expected", [("fp32", ("ieee", "ieee")), ("tf32", ("tf32", "tf32")),
                                             ("bf16", ("ieee", "ieee"))])
def test_a_policy_sets_matmuls_and_convolutions_together_and_restores_them(policy, expected):
    before = settings()
    with job_precision(policy):
        assert settings() == expected
    assert settings() == before
    with pytest.raises(ValueError, match="precision='fp16' is not one of fp32, tf32, bf16"):
        job_precision("fp16")


def test_only_bf16_autocasts_the_rectifier():
    x = torch.randn(2, 3)
    for policy in ("fp32", "tf32"):
        with rectifier_autocast(policy, x.device):
            assert (x @ x.T).dtype == torch.float32
    with rectifier_autocast("bf16", x.device):
        assert (x @ x.T).dtype == torch.bfloat16


def test_the_search_and_the_vaes_float32_are_ieee_under_a_tf32_policy(tmp_path, monkeypatch):
    seen = []
    quantizer = MultiGroupQuantizer((4, 2, 3), 6, 5)
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: (seen.append(("search", settings())), real_bmm(*a, **k))[1])
    vae = FrozenVAE.load(str(make_tiny_vae(tmp_path)), device="cpu")  # precision fp32 (the default)
    real_encode = vae.model.encode
    monkeypatch.setattr(vae.model, "encode", lambda x: (seen.append(("vae", settings())), real_encode(x))[1])
    with float32_math("tf32"):
        quantizer.nearest(torch.randn(3, 6, 4))
        vae.encode(torch.zeros(1, 3, 64, 64))
    assert {place for place, _ in seen} == {"search", "vae"}
    assert all(flags == ("ieee", "ieee") for _, flags in seen), seen
