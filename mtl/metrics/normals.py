"""Surface-normal scores: angular error over valid pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric


def angle_error_degrees(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angle between normalised vectors [B,3,H,W] -> [B,H,W], degrees.

    2·atan2(|p−g|, |p+g|) is accurate for small and large angles, unlike acos of the dot product.
    """
    pred, target = F.normalize(pred, dim=1), F.normalize(target, dim=1)
    return torch.rad2deg(2 * torch.atan2((pred - target).norm(dim=1), (pred + target).norm(dim=1)))


class NormalsMeanAngle(MeanMetric):
    """Mean angle error in degrees over the valid pixels (non-zero targets) of the dataset."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        valid = target.abs().sum(dim=1) > 0
        super().update(angle_error_degrees(preds, target)[valid])
