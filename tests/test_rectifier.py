"""Rectifier: identity at start, the reference's plain form, docs/method.md's parameter counts, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from revq_pipe.pipeline.rectifier import EfficientViTRectifier, build_rectifier
from revq_pipe.pipeline.rectifier_spec import RectifierSpec
from revq_pipe.stages.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = RectifierSpec(kind="vit", width=16, depth=1, head_dim=8)


def test_residual_rectifier_starts_as_the_exact_identity():
    torch.manual_seed(0)
    rectifier = build_rectifier(TINY, 4)
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(rectifier(x), x)


def test_plain_rectifier_is_not_the_identity_and_keeps_the_shape():
    torch.manual_seed(0)
    rectifier = build_rectifier(RectifierSpec(kind="vit", width=16, depth=1, head_dim=8, residual=False), 4)
    x = torch.randn(2, 4, 3, 3)
    y = rectifier(x)
    assert y.shape == x.shape and not torch.allclose(y, x)


@pytest.mark.parametrize("residual", [True, False])
def test_the_gate_scales_the_correction_and_one_leaves_the_output_untouched(residual):
    torch.manual_seed(0)
    rectifier = EfficientViTRectifier(4, 16, 1, head_dim=8, residual=residual)
    with torch.no_grad():
        rectifier.conv_out.weight.normal_(0.0, 0.1)
    x = torch.randn(2, 4, 5, 5)
    ungated = rectifier(x)  # g = 1: the plain form is h itself, the residual form x + h
    d = rectifier.correction(x)
    torch.testing.assert_close(ungated, x + d, rtol=1e-6, atol=1e-6)
    rectifier.residual_gate.fill_(0.25)
    torch.testing.assert_close(rectifier(x), x + 0.25 * d, rtol=1e-6, atol=1e-6)
    rectifier.residual_gate.fill_(0.0)
    torch.testing.assert_close(rectifier(x), x, rtol=0, atol=0 if residual else 1e-6)
    rectifier.residual_gate.fill_(1.0)
    assert torch.equal(rectifier(x), ungated)


def test_weights_saved_without_a_gate_load_with_the_gate_open():
    rectifier = EfficientViTRectifier(4, 16, 1, head_dim=8)
    state = {k: v for k, v in rectifier.state_dict().items() if k != "residual_gate"}
    rectifier.residual_gate.fill_(0.5)
    rectifier.load_state_dict(state, strict=True)
    assert rectifier.residual_gate.item() == 1.0


@pytest.mark.parametrize("name,millions", [("512T", 14.07), ("256T-B", 72.97), ("256T-L", 18.66)])
def test_presets_have_the_published_parameter_counts(name, millions):
    spec = load_config(CONFIGS / f"{name}.yaml").rectifier  # the YAML presets are the one source
    with torch.device("meta"):  # shapes only: nothing is allocated or run
        rectifier = build_rectifier(spec, 32)
    count = sum(p.numel() for p in rectifier.parameters())
    assert count == pytest.approx(millions * 1e6, rel=0.01)


def test_none_is_an_identity_without_parameters():
    rectifier = build_rectifier(RectifierSpec(kind="none"), 32)
    x = torch.randn(1, 32, 2, 2)
    assert list(rectifier.parameters()) == [] and rectifier(x) is x


def test_invalid_specs_are_refused_naming_the_setting_and_the_fix():
    """The module and build_rectifier answer with RectifierSpec.check's messages (the config loader's too)."""
    with pytest.raises(ValueError, match=r"rectifier.width=20 is not a multiple of the 8 latent channels .* choose a"):
        EfficientViTRectifier(8, 20, 1, head_dim=4)
    with pytest.raises(ValueError, match=r"rectifier.width=16 is not a multiple of rectifier.head_dim=5"):
        EfficientViTRectifier(4, 16, 1, head_dim=5)
    with pytest.raises(ValueError, match=r"rectifier.forward='fast' is not one of auto, channels_last, diffusers"):
        EfficientViTRectifier(4, 16, 1, head_dim=8, forward="fast")
    with pytest.raises(ValueError, match=r"rectifier.depth=-1 must be an integer >= 0"):
        build_rectifier(RectifierSpec(width=16, depth=-1, head_dim=8), 4)
    with pytest.raises(ValueError, match=r"latent_channels=0: a latent has at least one channel"):
        build_rectifier(TINY, 0)
    with pytest.raises(ValueError, match=r"rectifier.kind='mlp' is not one of vit, none"):
        build_rectifier(RectifierSpec(kind="mlp"), 4)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("size", [4, 2])  # 4x4 = 16 > head_dim: linear attention; 2x2: diffusers' quadratic branch
def test_channels_last_forward_matches_the_diffusers_forward(residual, size):
    torch.manual_seed(0)
    rectifier = EfficientViTRectifier(8, 64, 2, head_dim=8, residual=residual)
    with torch.no_grad():  # a last layer that is not zero, so every parameter gets a gradient
        rectifier.conv_out.weight.normal_(0.0, 0.1)
    x = torch.randn(3, 8, size, size)
    target = torch.randn_like(x)

    def value_and_grads(forward):
        rectifier.zero_grad()
        y = forward(x)
        torch.nn.functional.mse_loss(y, target).backward()
        return y.detach(), [p.grad.clone() for p in rectifier.parameters()]

    ours, our_grads = value_and_grads(rectifier)
    theirs, their_grads = value_and_grads(rectifier.forward_diffusers)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for (name, _), mine, reference in zip(rectifier.named_parameters(), our_grads, their_grads):
        scale = reference.abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_channels_last_forward_matches_the_diffusers_forward_under_bf16_autocast():
    # the dtype handling that train.precision=bf16 relies on, exercised through CPU autocast
    torch.manual_seed(0)
    rectifier = EfficientViTRectifier(8, 64, 2, head_dim=8)
    with torch.no_grad():
        rectifier.conv_out.weight.normal_(0.0, 0.1)
    x = torch.randn(3, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = rectifier(x), rectifier.forward_diffusers(x)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)
