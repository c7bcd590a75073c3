"""Per-element population statistics accumulated in float64 with an exact, order-defined merge."""

from __future__ import annotations

import numpy as np


class MomentAccumulator:
    """Running count, mean and sum of squared deviations (M2) per element of a (C, H, W) latent.

    Batches are combined with Chan et al.'s pairwise update ("Updating formulae and a pairwise
    algorithm for computing sample variances", 1979), which avoids the cancellation of
    sum-of-squares formulas when the mean is large next to the spread. The result depends only on
    the order of `update`/`merge` calls, so merging per-unit accumulators in unit order gives the
    same bits whatever the number of writers.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None  # (C, H, W) float64
        self._m2: np.ndarray | None = None  # (C, H, W) float64

    def update(self, x: np.ndarray) -> None:
        """Add a batch of latents (n, C, H, W); any float dtype, computed in float64."""
        if x.ndim < 1 or x.shape[0] == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        batch = MomentAccumulator()
        batch.count = x.shape[0]
        batch._mean = x.mean(axis=0)
        batch._m2 = np.square(x - batch._mean).sum(axis=0)
        self.merge(batch)

    def merge(self, other: "MomentAccumulator") -> None:
        """Fold another accumulator's samples into this one (this one's samples come first)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = other.count, other._mean.copy(), other._m2.copy()
            return
        if other._mean.shape != self._mean.shape:
            raise ValueError(f"cannot merge statistics of shape {other._mean.shape} into {self._mean.shape}")
        total = self.count + other.count
        delta = other._mean - self._mean
        self._mean = self._mean + delta * (other.count / total)
        self._m2 = self._m2 + other._m2 + np.square(delta) * (self.count * other.count / total)
        self.count = total

    def mean(self) -> np.ndarray:
        """Per-element mean, float64 (C, H, W)."""
        self._require_samples()
        return self._mean.copy()

    def std(self) -> np.ndarray:
        """Per-element population standard deviation (divides by n), float64 (C, H, W)."""
        self._require_samples()
        return np.sqrt(self._m2 / self.count)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that reproduce this accumulator exactly (count, mean, m2)."""
        if self.count == 0:
            return {"count": np.array(0, dtype=np.int64)}
        return {"count": np.array(self.count, dtype=np.int64), "mean": self._mean.copy(), "m2": self._m2.copy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> "MomentAccumulator":
        """Rebuild an accumulator saved with `state_dict`."""
        acc = cls()
        acc.count = int(state["count"])
        if acc.count > 0:
            acc._mean = np.asarray(state["mean"], dtype=np.float64).copy()
            acc._m2 = np.asarray(state["m2"], dtype=np.float64).copy()
        return acc

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("no samples were accumulated; statistics are undefined")
