"""Depth scores pooled over every valid pixel of the dataset."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import MeanSquaredError


class DepthRMSE(MeanSquaredError):
    """RMSE = sqrt(sum of squared errors / number of valid pixels), prediction clamped at 0.

    torchmetrics' MeanSquaredError already keeps dataset-level sums; this only masks invalid
    pixels (target 0) and clamps the prediction.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(squared=False, **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:
        valid = target > 0
        super().update(preds.clamp_min(0)[valid], target[valid])
