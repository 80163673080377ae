"""Surface-normal scores: angular error over the valid pixels of the dataset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

#: Width of the histogram bins (degrees) that give the median: the median is exact to this.
MEDIAN_BIN_WIDTH = 0.01
#: Angle thresholds (degrees) of the "share of pixels under" scores.
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)


def angle_error_degrees(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angle between normalised vectors [B,3,H,W] -> [B,H,W], degrees.

    2·atan2(|p−g|, |p+g|) is accurate for small and large angles, unlike acos of the dot product.
    """
    pred, target = F.normalize(pred, dim=1), F.normalize(target, dim=1)
    return torch.rad2deg(2 * torch.atan2((pred - target).norm(dim=1), (pred + target).norm(dim=1)))


class NormalsScores(Metric):
    """Mean and median angle error, shares under 11.25°, 22.5°, 30° (valid: non-zero target).

    Dataset-level sums and a histogram of the errors with bins of ``MEDIAN_BIN_WIDTH`` degrees
    (18,000 bins over [0°, 180°]); the median is interpolated linearly inside its bin, so it is
    within one bin width of the median of all pixel errors. All states are sums: exact under DDP.
    Hand-written because torchmetrics has no angular-error metric.
    """

    full_state_update = False

    def __init__(self, bin_width: float = MEDIAN_BIN_WIDTH, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bin_width = bin_width
        self.num_bins = round(180.0 / bin_width)
        self.add_state("angle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state(
            "under", torch.zeros(len(ANGLE_THRESHOLDS), dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state(
            "histogram", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        valid = target.abs().sum(dim=1) > 0
        angles = angle_error_degrees(preds.detach().double(), target.double())[valid]
        self.angle_sum += angles.sum()
        self.count += angles.numel()
        thresholds = torch.tensor(ANGLE_THRESHOLDS, dtype=angles.dtype, device=angles.device)
        self.under += (angles[:, None] < thresholds).sum(dim=0)
        bins = (angles / self.bin_width).long().clamp_(0, self.num_bins - 1)
        self.histogram += torch.bincount(bins, minlength=self.num_bins)

    def median(self) -> Tensor:
        """Median angle from the histogram, interpolated inside the bin that holds it."""
        cumulative = self.histogram.cumsum(0).double()
        half = cumulative[-1] / 2
        index = int(torch.searchsorted(cumulative, half))
        below = cumulative[index - 1] if index > 0 else cumulative.new_zeros(())
        inside = (half - below) / self.histogram[index].clamp_min(1)
        return (index + inside) * self.bin_width

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        shares = (self.under.double() / n).float()
        scores = {
            "mean_angle": (self.angle_sum / n).float(),
            "median_angle": self.median().float(),
        }
        for threshold, share in zip(ANGLE_THRESHOLDS, shares, strict=True):
            scores[f"within_{threshold:g}"] = share
        return scores


class NormalsMeanAngle(NormalsScores):
    """Mean angle error alone (a scalar), for code that needs a single normals score."""

    def compute(self) -> Tensor:
        return super().compute()["mean_angle"]
