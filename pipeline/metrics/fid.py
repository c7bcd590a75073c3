"""Frechet distance and Inception Score from accumulated, mergeable statistics.

Features are never stored: each set keeps float64 sums (count, sum, sum of outer products), so a
50,000-image evaluation needs O(D^2) memory and ranks combine by summing tensors. `FidEvaluator` is the
one accumulator of a reference set and the sets compared with it (stages/eval_metrics.py for eval and
the tolerance curve, stages/prior_eval.py for samples). The feature network is any module mapping uint8
images (B, 3, H, W) to an `InceptionOutput` (or a plain (B, D) feature tensor when no Inception Score is
wanted); tests use a tiny stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .inception import FEATURE_DIM, NUM_CLASSES, InceptionOutput


class FeatureStats:
    """Running float64 count, sum and sum of outer products of D-dimensional features.

    Args:
        dim: feature dimension D.
        device: where the sums live (the feature network's device avoids copies).
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (N, D)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features.shape)}")
        f = features.to(self.sum.device, torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f

    def tensors(self) -> list[torch.Tensor]:
        """The state, in a fixed order; summing each tensor across ranks merges the ranks."""
        return [self.count, self.sum, self.outer]

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D), float64, as numpy's np.cov(rowvar=False)."""
        n = int(self.count)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {n}")
        mean = self.sum.cpu().numpy() / n
        outer = self.outer.cpu().numpy()
        cov = (outer - n * np.outer(mean, mean)) / (n - 1)
        return mean, (cov + cov.T) / 2


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), in float64.

    S1 S2 is similar to (R1 R2)(R1 R2)^T with R = sqrt(S) symmetric, so tr sqrt(S1 S2) is the sum
    of the singular values of R1 R2. Unlike scipy's sqrtm this needs no offset for the singular
    covariances of small sets, never returns complex values, and avoids taking square roots of
    rounding noise in the (near-)null space.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    trace_sqrt = np.linalg.svd(_psd_sqrt(sigma1) @ _psd_sqrt(sigma2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_stats(real: FeatureStats, fake: FeatureStats) -> float:
    """Frechet distance between two accumulated feature sets."""
    return frechet_distance(*real.mean_and_covariance(), *fake.mean_and_covariance())


class InceptionScoreStats:
    """Per-split sums for the Inception Score, exp(E_x KL(p(y|x) || p(y))).

    Image i goes to split `i % splits` (i: its index in the evaluated set, or the arrival order),
    so ranks can sum their states. Per split we keep the count, the sum of p(y|x) and the sum of
    sum_y p log p; the mean KL of a split is then mean(sum_y p log p) - sum_y pbar log pbar, exact.
    The reference implementations split a (shuffled) list into `splits` contiguous chunks; with
    the usual 10 splits both assignments give random tenths of the set.

    Args:
        num_classes: number of logits per image (1008 for the FID Inception).
        splits: number of splits; the score is the mean over splits, its std the spread (10 is standard).
        device: where the sums live.
    """

    def __init__(self, num_classes: int, splits: int = 10, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.splits = splits
        self.count = torch.zeros(splits, dtype=torch.int64, device=device)
        self.prob_sum = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)  # (S, C)
        self.plogp_sum = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)
        self._seen = 0

    def update(self, logits: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Add logits (N, C); `indices` (N,) are the images' positions in the set (default: arrival order)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (N, {self.num_classes}), got {tuple(logits.shape)}")
        device = self.count.device
        n = logits.shape[0]
        if indices is None:
            indices = torch.arange(self._seen, self._seen + n)
        self._seen += n
        split = indices.to(device, torch.int64) % self.splits  # (N,)
        probs = torch.softmax(logits.to(device, torch.float64), dim=1)  # (N, C)
        self.count.index_add_(0, split, torch.ones_like(split))
        self.prob_sum.index_add_(0, split, probs)
        self.plogp_sum.index_add_(0, split, torch.xlogy(probs, probs).sum(dim=1))

    def tensors(self) -> list[torch.Tensor]:
        """The state, in a fixed order; summing each tensor across ranks merges the ranks."""
        return [self.count, self.prob_sum, self.plogp_sum]

    def compute(self) -> tuple[float, float]:
        """(mean, std) of exp(mean KL) over the splits (std with ddof=0, as the original code)."""
        count = self.count.cpu().double()
        if bool((count == 0).any()):
            raise ValueError(f"Inception Score needs at least {self.splits} images (one per split), "
                             f"split counts are {self.count.tolist()}")
        marginal = self.prob_sum.cpu() / count[:, None]  # (S, C)
        mean_kl = self.plogp_sum.cpu() / count - torch.xlogy(marginal, marginal).sum(dim=1)
        scores = torch.exp(mean_kl)
        return float(scores.mean()), float(scores.std(correction=0))


@dataclass
class FidResult:
    """FID of one image set against the reference set, and that set's Inception Score; a value that cannot be
    computed is None with the reason in `missing` ("rfid" / "inception_score" -> why)."""

    fid: float | None
    inception_score: float | None
    inception_score_std: float | None
    num_real: int
    num_fake: int
    missing: dict[str, str] = field(default_factory=dict)


class FidEvaluator:
    """Accumulates the features of one reference set and of named sets compared with it (reconstructions,
    samples), and each named set's Inception Score, batch by batch; ranks merge by summing `tensors()`.

    Args:
        feature_net: module mapping uint8 images (B, 3, H, W) to an `InceptionOutput` (or a (B, D) feature
            tensor); its `feature_dim` and `num_classes` attributes size the sums (the FID Inception's when it
            has none). num_classes None or 0: no Inception Score.
        sources: names of the sets compared with the reference set.
        inception_score: False to skip the Inception Score even when the network gives logits.
        splits: Inception Score splits (10 is standard).
        device: where the statistics live; defaults to the feature net's device.
    """

    def __init__(self, feature_net: nn.Module, sources: Sequence[str] = ("fake",), *, inception_score: bool = True,
                 splits: int = 10, device: str | torch.device | None = None):
        if device is None:
            first = next(feature_net.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        dim = getattr(feature_net, "feature_dim", FEATURE_DIM)
        classes = getattr(feature_net, "num_classes", NUM_CLASSES) if inception_score else None
        self.feature_net = feature_net.eval()
        self.real = FeatureStats(dim, device)
        self.fake = {name: FeatureStats(dim, device) for name in sources}
        self.inception = {name: InceptionScoreStats(classes, splits, device) for name in sources} if classes else {}
        self._no_inception = None if classes else ("the feature network gives no class logits" if inception_score
                                                   else "not asked for (inception_score=False)")

    @torch.no_grad()
    def _extract(self, images: torch.Tensor) -> InceptionOutput:
        out = self.feature_net(images)
        return out if isinstance(out, InceptionOutput) else InceptionOutput(features=out, logits=None)

    def update_real(self, images: torch.Tensor) -> None:
        """Add reference images, uint8 (B, 3, H, W)."""
        self.real.update(self._extract(images).features)

    def update_fake(self, images: torch.Tensor, source: str = "fake", indices: torch.Tensor | None = None) -> None:
        """Add images of `source`, uint8 (B, 3, H, W); `indices` (B,) place them in Inception Score splits."""
        if source not in self.fake:
            raise ValueError(f"source={source!r} is not one of the sets this evaluator compares: {list(self.fake)}")
        out = self._extract(images)
        self.fake[source].update(out.features)
        if self.inception and out.logits is None:  # the same on every rank, so their tensors() still agree
            self.inception, self._no_inception = {}, "the feature network gives no class logits"
        if self.inception:
            self.inception[source].update(out.logits, indices)

    def tensors(self) -> list[torch.Tensor]:
        """All state tensors in a fixed order: all-reduce (sum) each of them to merge ranks."""
        tensors = self.real.tensors() + [t for stats in self.fake.values() for t in stats.tensors()]
        return tensors + [t for stats in self.inception.values() for t in stats.tensors()]

    def all_reduce_(self, reduce_sum_: Callable[[torch.Tensor], object]) -> None:
        """Sum the state over ranks in place, e.g. `evaluator.all_reduce_(ctx.all_reduce_sum_)`."""
        for tensor in self.tensors():
            reduce_sum_(tensor)

    def compute(self, source: str = "fake") -> FidResult:
        """FID between the reference set and `source`, and the Inception Score of `source` (after all_reduce_)."""
        fake, missing = self.fake[source], {}
        fid = score = spread = None
        if min(int(self.real.count), int(fake.count)) < 2:
            missing["rfid"] = (f"FID needs at least 2 images in each set, got {int(self.real.count)} reference and "
                               f"{int(fake.count)} {source} images")
        else:
            fid = fid_from_stats(self.real, fake)
        if self._no_inception is not None:
            missing["inception_score"] = self._no_inception
        else:
            try:
                score, spread = self.inception[source].compute()
            except ValueError as error:  # fewer images than splits
                missing["inception_score"] = str(error)
        return FidResult(fid=fid, inception_score=score, inception_score_std=spread, num_real=int(self.real.count),
                         num_fake=int(fake.count), missing=missing)
