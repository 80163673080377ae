"""MoDo: multi-objective gradient with double sampling [Chen, Fernando et al., NeurIPS 2023 /
JMLR 2024].

The task weights λ (on the simplex, kept across steps, λ_0 = 1/T) take a projected step on the
MGDA objective estimated without bias from two independent mini-batches:

    λ ← Π_Δ(λ − γ (J₁J₂ᵀ λ + ρ λ)),   d = J₃ᵀλ (3 parts, LibMTL) or ((J₁ + J₂)/2)ᵀλ (2 parts)

The batch is split into the parts (see `MultiBatchMethod`). Heads get the mean over the parts
of their task's gradient (LibMTL divides the three batches' sum by 3). ``param`` mode only: the
cross-matrix of feature gradients of different samples has no meaning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancers.full_jacobian import MultiBatchMethod, project_onto_simplex


class MoDo(MultiBatchMethod):
    """MoDo.

    Args:
        num_tasks: T (filled in by the framework).
        gamma: step size of λ (LibMTL 1e-3; TorchJD 0.1).
        rho: ℓ2 regularisation of the λ step.
        parts: 3 (λ from parts 1-2, update on part 3, as LibMTL) or 2 (update on their mean).
        head_reduction: ``mean`` (LibMTL) or ``sum`` over the parts.
        mode: only ``param``.
    """

    def __init__(
        self,
        num_tasks: int,
        gamma: float = 1e-3,
        rho: float = 0.1,
        parts: int = 3,
        head_reduction: str = "mean",
        mode: str = "param",
    ) -> None:
        super().__init__(parts, head_reduction, mode)
        if gamma <= 0 or rho < 0:
            raise ValueError(f"balancer.gamma={gamma}, balancer.rho={rho}; expected > 0 and >= 0")
        self.gamma, self.rho = gamma, rho
        self.register_buffer(
            "task_weights", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        )

    def weights_from(self, cross: Tensor) -> Tensor:
        lam = self.task_weights.cpu()
        lam = project_onto_simplex(lam - self.gamma * (cross @ lam + self.rho * lam))
        self.task_weights.copy_(lam)
        return lam
