"""Gradient vaccine [Wang et al., ICLR 2021]: PCGrad with an adaptive similarity target."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.checks import number_problems, raise_first
from mtl.balancers.gramian import GramianMethod


class GradVac(GramianMethod):
    """GradVac: for each task i and every other task j in a random order, with φ the cosine of
    the current g_i' and g_j and φ̂_ij a moving average of it: if φ < φ̂_ij,
    g_i' += g_j·‖g_i'‖(φ̂_ij√(1−φ²) − φ√(1−φ̂_ij²)) / (‖g_j‖√(1−φ̂_ij²) + ε); after every pair,
    φ̂_ij ← (1−β)φ̂_ij + βφ. The update is Σ_i g_i' (sum, as LibMTL and TorchJD). With φ̂ = 0
    (the initial state) a correction is exactly PCGrad's projection.

    Each g_i' is tracked as coefficients over the original gradients, so only G is needed (one
    target for the whole shared model: LibMTL's default grouping). The order comes from the
    (seed, step) generator, drawn as PCGrad draws it, and φ̂ is computed from the all-reduced
    Gramian: identical on every process. φ̂ is a buffer (saved in checkpoints) and moves once per
    optimiser step: further aggregations in the same step (flat regions' second part) use it
    without moving it.
    """

    def __init__(
        self, num_tasks: int, beta: float = 0.5, eps: float = 1e-8, mode: str = "param"
    ) -> None:
        super().__init__(mode)
        raise_first(self.config_problems({"beta": beta, "eps": eps}, ()))
        self.beta, self.eps = beta, eps
        self.register_buffer("target", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))
        self.register_buffer("updated_step", torch.tensor(-1, dtype=torch.int64))

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters, one line each (see mtl.balancers.checks)."""
        rules = [
            ("beta", 0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("eps", 1e-8, lambda v: v >= 0, "a number >= 0"),
        ]
        return number_problems(config, "balancer", rules)

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        t = gram.shape[0]
        target = self.target.detach().cpu().clone()
        generator = context.generator()
        coefficients = torch.eye(t, dtype=torch.float64)
        for i in range(t):
            products = coefficients[i] @ gram  # g_i'·g_k for every k
            for j in torch.randperm(t, generator=generator).tolist():
                if j == i:
                    continue
                norm_i = (products @ coefficients[i]).clamp_min(0.0).sqrt()
                norm_j = gram[j, j].clamp_min(0.0).sqrt()
                phi = products[j] / (norm_i * norm_j + self.eps)
                phi_hat = target[i, j]
                if phi < phi_hat and norm_j > 0:  # a zero g_j has nothing to add
                    root_phi = (1 - phi**2).clamp_min(0.0).sqrt()
                    root_hat = (1 - phi_hat**2).clamp_min(0.0).sqrt()
                    step = (
                        norm_i
                        * (phi_hat * root_phi - phi * root_hat)
                        / (norm_j * root_hat + self.eps)
                    )
                    coefficients[i, j] += step
                    products = products + step * gram[j]
                target[i, j] = (1 - self.beta) * phi_hat + self.beta * phi
        if int(self.updated_step) != context.step:
            self.target.copy_(target)
            self.updated_step.fill_(context.step)
        return coefficients.sum(dim=0)
