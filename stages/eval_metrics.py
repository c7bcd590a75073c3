"""Image metrics of reconstructions against a reference set, accumulated per rank and summed across ranks.

Every image is on the 8-bit grid (pipeline.images.to_uint8) before it reaches a metric. PSNR,
PSNR-Y, SSIM and LPIPS are means over images; FID and the Inception Score come from the library's
accumulator of float64 feature statistics (pipeline.metrics.FidEvaluator), which ranks merge by summing tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from revq_pipe.pipeline.metrics import FidEvaluator, psnr_rgb, psnr_y, ssim, try_load_fid_inception, try_load_lpips
from revq_pipe.stages.distributed import DistContext

FID_BACKEND = "revq-pipe FID InceptionV3 (pt_inception-2015-12-05)"
IMAGE_METRICS = ("rfid", "inception_score", "psnr", "psnr_y", "ssim", "lpips")
INCEPTION_SPLITS = 10
_SUMS = ("images", "psnr", "psnr_y", "ssim", "lpips")  # rows of the per-source float64 sums


@dataclass
class MetricNetworks:
    """The FID Inception and LPIPS networks, each None (with the reason in `missing`) without weights."""

    fid: nn.Module | None
    lpips: nn.Module | None
    missing: dict[str, str] = field(default_factory=dict)  # "fid" / "lpips" -> why it is not computed

    @property
    def fid_sha256(self) -> str | None:
        return getattr(self.fid, "weights_sha256", None)

    @property
    def lpips_sha256(self) -> dict | str | None:
        return getattr(self.lpips, "weights_sha256", None)


def load_metric_networks(fid_weights: str, lpips_weights: str, device: torch.device) -> MetricNetworks:
    """Networks from eval.fid_weights / eval.lpips_weights (or REVQ_FID_WEIGHTS / REVQ_LPIPS_WEIGHTS).

    Weights that are not given make the metric unavailable; weights that are given but unreadable raise.
    """
    fid, fid_reason = try_load_fid_inception(fid_weights or None, device)
    lpips, lpips_reason = try_load_lpips(lpips_weights or None, device)
    missing = {name: reason for name, reason in (("fid", fid_reason), ("lpips", lpips_reason)) if reason}
    return MetricNetworks(fid=fid, lpips=lpips, missing=missing)


class ReconstructionMetrics:
    """PSNR, PSNR-Y, SSIM, LPIPS, FID and Inception Score of named reconstruction sources vs one reference set.

    Args:
        sources: names of the reconstruction sources, e.g. ["tokenizer", "vae_ceiling"].
        nets: the metric networks (either may be None).
        device: where the sums live.
    """

    def __init__(self, sources: list[str], nets: MetricNetworks, device: torch.device) -> None:
        self.nets = nets
        self.sums = {name: torch.zeros(len(_SUMS), dtype=torch.float64, device=device) for name in sources}
        self.fid = (FidEvaluator(nets.fid, sources, splits=INCEPTION_SPLITS, device=device)
                    if nets.fid is not None else None)

    @torch.no_grad()
    def update(self, reference: torch.Tensor, reconstructions: dict[str, torch.Tensor], indices: torch.Tensor) -> None:
        """Add a batch: uint8 reference images (B, 3, R, R), uint8 reconstructions per source, set indices (B,)."""
        if self.fid is not None:
            self.fid.update_real(reference)
        for name, images in reconstructions.items():
            sums = self.sums[name]
            sums[0] += images.shape[0]
            sums[1] += psnr_rgb(reference, images).sum()
            sums[2] += psnr_y(reference, images).sum()
            sums[3] += ssim(reference, images).sum()
            if self.nets.lpips is not None:
                sums[4] += self.nets.lpips(reference, images).double().sum().to(sums.device)
            if self.fid is not None:
                self.fid.update_fake(images, name, indices)

    def all_reduce_(self, ctx: DistContext) -> None:
        """Sum every statistic over the ranks, in place."""
        for tensor in self.sums.values():
            ctx.all_reduce_sum_(tensor)
        if self.fid is not None:
            self.fid.all_reduce_(ctx.all_reduce_sum_)

    def result(self, name: str) -> tuple[dict[str, float | None], dict[str, str]]:
        """(metrics, why each null metric is null) of one source, after all_reduce_."""
        sums = dict(zip(_SUMS, self.sums[name].tolist()))
        n = int(sums["images"])
        values: dict[str, float | None] = {}
        missing: dict[str, str] = {}
        for metric in ("psnr", "psnr_y", "ssim"):
            values[metric] = _mean(sums[metric], n, metric, missing)
        if self.nets.lpips is None:
            values["lpips"], missing["lpips"] = None, self.nets.missing["lpips"]
        else:
            values["lpips"] = _mean(sums["lpips"], n, "lpips", missing)
        if self.fid is None:
            values["rfid"] = values["inception_score"] = values["inception_score_std"] = None
            missing["rfid"] = missing["inception_score"] = self.nets.missing["fid"]
        else:
            fid = self.fid.compute(name)
            values.update(rfid=fid.fid, inception_score=fid.inception_score,
                          inception_score_std=fid.inception_score_std)
            missing.update(fid.missing)
        return values, missing


def _mean(total: float, count: int, metric: str, missing: dict[str, str]) -> float | None:
    """total / count, or None with a reason when there are no images or the mean is not finite."""
    if count == 0:
        missing[metric] = "no images were evaluated"
        return None
    value = total / count
    if not math.isfinite(value):
        missing[metric] = f"{metric} is infinite: some reconstructions equal their reference exactly"
        return None
    return value
