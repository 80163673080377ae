"""Loss-weighting balancers: one backward of a weighted sum of the task losses."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext, Balancer


class LossWeighting(Balancer):
    """Base of the loss-only methods: choose weights from the losses, backward their sum."""

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> dict[str, float]:
        weights = self.weights(losses, context)
        total = torch.stack([weights[task] * loss for task, loss in losses.items()]).sum()
        context.backward(total)
        return {task: float(w) for task, w in weights.items()}


class Equal(LossWeighting):
    """Every task loss with weight 1 (the static loss weights are applied before)."""

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> dict[str, Tensor]:
        return {task: torch.ones((), device=loss.device) for task, loss in losses.items()}
