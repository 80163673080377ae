"""IMTL-L, the loss part of Impartial MTL [Liu et al., ICLR 2021]: learnable scales s_t (s₀ = 0,
optimised with the model) and the loss Σ_t (e^{s_t}·L_t − s_t). At the optimum over s,
e^{s_t}·L_t = 1: every scaled loss is 1. It equals twice uncertainty weighting evaluated at
−s (TorchJD's ``IMTLL`` docstring); the scales are parameters, so they land in checkpoints, and
under DDP their gradient e^{s}·mean(L) − 1 is averaged with the model's."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext
from mtl.balancers.weighting import LossWeighting


class IMTLL(LossWeighting):
    """Loss weights e^{s_t} with the regulariser −Σ_t s_t."""

    def __init__(self, num_tasks: int, init_scale: float = 0.0, mode: str = "param") -> None:
        super().__init__(mode)
        self.log_scales = nn.Parameter(torch.full((num_tasks,), float(init_scale)))

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        return self.log_scales.exp()

    def regulariser(self) -> Tensor:
        return -self.log_scales.sum()
