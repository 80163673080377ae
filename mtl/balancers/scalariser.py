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

from collections.abc import Mapping, Sequence

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


class PreferenceScalariser(Scalariser):
    """A scalariser conditioned on a preference vector p over the tasks: ``uniform`` (1/T each),
    ``dirichlet`` (drawn anew every step from Dirichlet(1), uniform on the simplex, to cover the
    Pareto front), or T non-negative numbers. The draws come from the (seed, step) generator, so
    every process draws the same p."""

    def __init__(
        self, num_tasks: int, preference: str | Sequence[float] = "uniform", mode: str = "param"
    ) -> None:
        super().__init__(mode)
        self.num_tasks, self.draw = num_tasks, preference == "dirichlet"
        if preference in ("uniform", "dirichlet"):
            self.fixed = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
            return
        problem = isinstance(preference, str) or len(preference) != num_tasks
        if not problem:
            self.fixed = torch.tensor([float(v) for v in preference], dtype=torch.float64)
            problem = bool((self.fixed < 0).any() or self.fixed.sum() <= 0)
        if problem:
            raise ValueError(
                f"balancer.preference: {preference!r}; expected 'uniform', 'dirichlet' or "
                f"{num_tasks} non-negative numbers, not all 0"
            )

    def preference(self, context: BalanceContext) -> Tensor:
        """This step's preference (float64, CPU)."""
        if not self.draw:
            return self.fixed
        # Dirichlet(1, ..., 1) = independent Exp(1) draws normalised to sum 1
        draws = torch.empty(self.num_tasks, dtype=torch.float64)
        draws.exponential_(generator=context.generator())
        return draws / draws.sum()
