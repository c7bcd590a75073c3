"""LatentNormalizer: per-element standardization and its guards."""

from __future__ import annotations

import pytest
import torch

from revq_pipe.pipeline.normalizer import MIN_STD, LatentNormalizer


def test_normalize_and_denormalize_are_inverse_per_element():
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.randn(3, 2, 2, generator=generator), torch.rand(3, 2, 2, generator=generator) + 0.5
    normalizer = LatentNormalizer(mean, std)
    z = torch.randn(5, 3, 2, 2, generator=generator)
    torch.testing.assert_close(normalizer.normalize(z), (z - mean) / std)
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(z)), z)
    assert set(normalizer.state_dict()) == {"mean", "std"}


def test_constant_element_is_floored_not_nan():
    std = torch.ones(1, 2, 2)
    std[0, 0, 0] = 0.0
    normalizer = LatentNormalizer(torch.zeros(1, 2, 2), std)
    assert normalizer.std[0, 0, 0] == MIN_STD
    out = normalizer.normalize(torch.zeros(2, 1, 2, 2))
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("bad,message", [(-1.0, "negative"), (float("nan"), "NaN or infinite")])
def test_corrupt_statistics_are_refused(bad, message):
    std = torch.ones(1, 2, 2)
    std[0, 1, 1] = bad
    with pytest.raises(ValueError, match=message):
        LatentNormalizer(torch.zeros(1, 2, 2), std)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="mean has shape"):
        LatentNormalizer(torch.zeros(1, 2, 2), torch.ones(2, 2, 2))
