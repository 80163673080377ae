"""Geometric loss strategy [Chennupati et al. 2019, MultiNet++]: minimise the geometric mean of
the task losses, GM(L) = (Π_t L_t)^(1/T), evaluated as exp(mean_t log L_t) (the product under- or
overflows with many tasks or small losses). Gradient weights GM(L) / (T·L_t): the log-loss
direction scaled by GM/T."""

from __future__ import annotations

from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.scalariser import Scalariser


class GLS(Scalariser):
    """exp(mean_t log L_t); the losses must be positive."""

    def scalarise(self, losses: Tensor, context: BalanceContext) -> Tensor:
        return losses.log().mean().exp()
