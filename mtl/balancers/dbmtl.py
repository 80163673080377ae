"""DB-MTL: dual balancing of loss scales and gradient magnitudes [Lin et al., arXiv 2308.12029].

Each task's gradient is taken on its log-loss, g_t = ∇log(L_t + ε) = ∇L_t / (L_t + ε) (loss-scale
balancing); an exponential moving average m_t of g_t is kept in parameter space, and every m_t is
rescaled to the largest norm before summing (gradient-magnitude balancing):

    m_t ← (1 − β_k) g_t + β_k m_t,   β_k = β / k^σ,   m_0 = 0 (no bias correction)
    d = Σ_t α_t m_t,   α_t = max_s |m_s| / (|m_t| + ε)

Each head gets its own log-loss gradient ∇L_t / (L_t + ε). The state m is a T x P buffer (P the
shared parameters). ``param`` mode only: in ``rep`` mode the coordinates of m would be features
of other samples at every step (and of other processes under DDP), so its average has no meaning;
LibMTL refuses ``rep_grad`` too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.full_jacobian import JacobianMethod

EPS = 1e-8


class DBMTL(JacobianMethod):
    """DB-MTL (LibMTL's ``DB_MTL`` update, its defaults).

    Args:
        beta: EMA coefficient β of the gradient buffer.
        beta_sigma: decay σ of β over steps (β_k = β / k^σ; 0 keeps β constant).
        mode: only ``param``.
    """

    stateful = True
    lazy_buffers = ("momentum",)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, mode: str = "param") -> None:
        super().__init__(mode)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"balancer.beta={beta}; expected a number in [0, 1]")
        self.beta, self.beta_sigma = beta, beta_sigma
        self.register_buffer("momentum", torch.zeros(0, 0))  # T x P, sized at the first step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        log_grads = jacobian / (losses[:, None] + EPS)
        if self.momentum.shape != jacobian.shape:
            self.momentum = torch.zeros_like(jacobian)
            self.steps.zero_()
        self.steps += 1
        beta = self.beta / float(self.steps) ** self.beta_sigma
        self.momentum.lerp_(log_grads, 1.0 - beta)  # m + (1 − β)(g − m) = (1 − β) g + β m
        norms = self.momentum.norm(dim=1)
        alpha = norms.max() / (norms + EPS)
        return alpha @ self.momentum, alpha

    def head_scales(self, losses: Tensor, weights: Tensor) -> Tensor:
        return 1.0 / (losses + EPS)
