"""Depth scores pooled over every valid pixel of the dataset."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

#: Floor of the prediction inside logarithms and ratios (as in the MTI-Net/ATRC evaluation code).
LOG_EPS = 1e-9


class DepthScores(Metric):
    """RMSE, abs-rel, sq-rel, log-RMSE and δ<1.25 over all valid pixels (target > 0) of the
    dataset.

    The prediction is clamped at 0 (at 1e-9 inside logs and ratios). Every score is a ratio of
    dataset-level sums, so it is exact under DDP: ``rmse = sqrt(Σ(p−g)² / N)``,
    ``abs_rel = Σ|p−g|/g / N``, ``sq_rel = Σ(p−g)²/g / N`` (InvPT reports it),
    ``log_rmse = sqrt(Σ(log p − log g)² / N)``, ``delta1 = #{max(p/g, g/p) < 1.25} / N``.
    Hand-written because torchmetrics has no pooled masked depth metric (its MeanSquaredError
    covers only the first of the five).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("squared_error", "abs_rel", "sq_rel", "squared_log_error", "delta1", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        valid = target > 0
        pred = preds.detach().clamp_min(0)[valid].double()
        true = target[valid].double()
        floored = pred.clamp_min(LOG_EPS)
        self.squared_error += ((pred - true) ** 2).sum()
        self.abs_rel += ((pred - true).abs() / true).sum()
        self.sq_rel += ((pred - true) ** 2 / true).sum()
        self.squared_log_error += ((floored.log() - true.log()) ** 2).sum()
        self.delta1 += (torch.maximum(floored / true, true / floored) < 1.25).sum()
        self.count += true.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        return {
            "rmse": (self.squared_error / n).sqrt().float(),
            "abs_rel": (self.abs_rel / n).float(),
            "sq_rel": (self.sq_rel / n).float(),
            "log_rmse": (self.squared_log_error / n).sqrt().float(),
            "delta1": (self.delta1 / n).float(),
        }


class DepthRMSE(DepthScores):
    """RMSE alone (a scalar), for code that needs a single depth score."""

    def compute(self) -> Tensor:
        return super().compute()["rmse"]
