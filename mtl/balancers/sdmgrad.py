"""SDMGrad: stochastic direction-oriented multi-objective gradient [Xiao et al., NeurIPS 2023,
arXiv 2305.18409].

From two independent mini-batches ξ, ξ′: A = J_ξ J_ξ′ᵀ, scaled by s = mean_t √max(A_tt, 0),
Â = A / (s² + 1e-8). The weights w (on the simplex, warm-started across steps, w_0 = 1/T) take
``n_iter`` momentum-SGD steps on ½‖J(w + λw̃)‖², each followed by the projection onto the simplex:

    v ← μ v + Â(w + λ w̃) (v restarts at every step),   w ← Π_Δ(w − lr·v)
    d = J_ζᵀ (w + λ w̃) / (1 + λ),   w̃ = 1/T (the mean gradient as the preferred direction)

ξ, ξ′, ζ are the three parts of the batch (see `MultiBatchMethod`; 2 parts: ζ is their mean).
Heads get the sum over the parts of their task's gradient, as LibMTL (three per-task backward
passes, not divided): with equal parts, ``parts`` times their full-batch gradient. ``param`` mode
only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancers.full_jacobian import MultiBatchMethod, project_onto_simplex


class SDMGrad(MultiBatchMethod):
    """SDMGrad.

    Args:
        num_tasks: T (filled in by the framework).
        lamda: λ, the pull towards the mean gradient.
        n_iter: inner momentum-SGD iterations per step.
        lr: inner learning rate (LibMTL 5; TorchJD 10).
        momentum: inner momentum μ.
        parts: 3 (ξ, ξ′, ζ) or 2 (ζ = the mean of ξ and ξ′).
        head_reduction: ``sum`` (LibMTL) or ``mean`` over the parts.
        mode: only ``param``.
    """

    def __init__(
        self,
        num_tasks: int,
        lamda: float = 0.3,
        n_iter: int = 20,
        lr: float = 5.0,
        momentum: float = 0.5,
        parts: int = 3,
        head_reduction: str = "sum",
        mode: str = "param",
    ) -> None:
        super().__init__(parts, head_reduction, mode)
        if lamda < 0 or n_iter < 1 or lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"balancer.lamda={lamda}, n_iter={n_iter}, lr={lr}, momentum={momentum}; "
                "expected lamda >= 0, n_iter >= 1, lr > 0, 0 <= momentum < 1"
            )
        self.lamda, self.n_iter, self.lr, self.momentum = lamda, int(n_iter), lr, momentum
        self.register_buffer(
            "task_weights", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        )

    def weights_from(self, cross: Tensor) -> Tensor:
        tasks = cross.shape[0]
        scale = cross.diagonal().clamp_min(0.0).sqrt().mean()
        scaled = cross / (scale**2 + 1e-8)
        preferred = torch.full((tasks,), 1.0 / tasks, dtype=torch.float64)
        w, velocity = self.task_weights.cpu(), None
        for _ in range(self.n_iter):
            grad = scaled @ (w + self.lamda * preferred)
            velocity = grad if velocity is None else self.momentum * velocity + grad
            w = project_onto_simplex(w - self.lr * velocity)
        self.task_weights.copy_(w)
        return (w + self.lamda * preferred) / (1.0 + self.lamda)
