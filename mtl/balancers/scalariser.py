"""Scalarisers: the update is the gradient of one scalar function f of the task losses.

d/dθ f(L(θ)) = Σ_t (∂f/∂L_t)·∇L_t, so a scalariser is a loss weighting whose weights are the
partial derivatives of f at the current losses, found by autograd in float64 on the CPU. One
backward of Σ_t w_t L_t then gives the update, and the weights are exactly those f defines
(several can be negative, e.g. PBI and COSMOS).

Under DDP the weights are taken at the losses averaged over processes (the loss of the global
batch), so every process uses the same weights and the averaged update is ∇f of the global
losses, as on one process.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.weighting import LossWeighting


def global_losses(losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
    """The detached task losses (float64, CPU), averaged over processes under DDP."""
    stacked = torch.stack([loss.detach() for loss in losses.values()])
    if context.world_size > 1:
        stacked = context.all_reduce_mean(stacked)
    return stacked.double().cpu()


def gradient_weights(function, values: Tensor) -> Tensor:
    """∂f/∂L at `values` (float64 leaf): the gradient weights of the scalariser f."""
    with torch.enable_grad():
        leaf = values.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(function(leaf), leaf)
    return grad


class Scalariser(LossWeighting):
    """Base of the scalarisers: implement `scalarise` (a scalar function of the loss vector)."""

    def scalarise(self, losses: Tensor, context: BalanceContext) -> Tensor:
        """f(L) for the float64 vector of task losses (differentiable in `losses`)."""
        raise NotImplementedError

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        values = global_losses(losses, context)
        grad = gradient_weights(lambda v: self.scalarise(v, context), values)
        return grad.float().to(next(iter(losses.values())).device)
