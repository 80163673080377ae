"""MoCo: multi-objective gradient correction with a tracked direction [Fernando et al., ICLR 2023].

Each task gradient is rescaled to the length of its loss, ĝ_t = g_t · L_t / (|g_t| + 1e-8); a
tracking variable y (a T x P buffer) follows them, and the task weights λ take a softmax step on
the MGDA objective of y:

    y ← y − β_k (y − ĝ),   λ ← softmax(λ − γ_k (y yᵀ + ρ I) λ),   d = yᵀλ
    β_k = β / k^{σ_β},   γ_k = γ / k^{σ_γ},   y_0 = 0,   λ_0 = 1/T

Heads get their own task gradients ∇L_t. ``param`` mode only (as LibMTL): y averages over steps,
and in ``rep`` mode its coordinates would be other samples' features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.full_jacobian import JacobianMethod
from mtl.balancers.jacobian import gramian


class MoCo(JacobianMethod):
    """MoCo (LibMTL's ``MoCo`` update and defaults).

    Args:
        num_tasks: T (filled in by the framework).
        beta, beta_sigma: step size of y and its decay over steps.
        gamma, gamma_sigma: step size of λ and its decay over steps.
        rho: ℓ2 regularisation of the λ step.
        mode: only ``param``.
    """

    stateful = True
    lazy_buffers = ("tracked",)

    def __init__(
        self,
        num_tasks: int,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        mode: str = "param",
    ) -> None:
        super().__init__(mode)
        self.beta, self.beta_sigma = beta, beta_sigma
        self.gamma, self.gamma_sigma, self.rho = gamma, gamma_sigma, rho
        self.register_buffer("tracked", torch.zeros(0, 0))  # y: T x P, sized at the first step
        self.register_buffer(
            "task_weights", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        )  # λ, float64 like its T x T step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        if self.tracked.shape != jacobian.shape:
            self.tracked = torch.zeros_like(jacobian)
        self.steps += 1
        step = float(self.steps)
        scaled = jacobian * (losses / (jacobian.norm(dim=1) + 1e-8))[:, None]
        self.tracked.lerp_(scaled, self.beta / step**self.beta_sigma)
        # λ in float64 on the CPU (a T x T problem): identical on every process
        gram = gramian(self.tracked) + self.rho * torch.eye(len(self.tracked), dtype=torch.float64)
        lam = self.task_weights.cpu()
        lam = torch.softmax(lam - self.gamma / step**self.gamma_sigma * gram @ lam, dim=0)
        self.task_weights.copy_(lam)
        weights = self.task_weights.clone()
        return weights.to(jacobian) @ self.tracked, weights
