"""ExcessMTL: robust task weights from excess-risk estimates [He et al., ICML 2024].

A running sum of squared gradients S_t += g_t ⊙ g_t (a T x P buffer) gives a diagonal curvature
estimate; the excess risk of task t is estimated as Ê_t = Σ_p g_{t,p}² / √(S_{t,p} + 1e-7) and
divided by a baseline Ê⁰_t (the first step's, or the mean over the warm-up steps). The weights
take an exponentiated-gradient step w_t ← w_t · exp(η Ê_t / Ê⁰_t) and are renormalised; the shared
update is d = Σ_t w_t g_t.

Two conventions:
    ``libmtl`` (LibMTL and the official code): w_0 = 1, Σw = T, no update on the first step
        (it only records Ê⁰); each head gets w_t ∇L_t (they backpropagate Σ_t w_t L_t).
    ``torchjd`` (TorchJD 0.18, the paper): w_0 = 1/T, Σw = 1, the first step updates with the raw
        Ê; each head gets its own ∇L_t.
With ``warmup_steps`` > 0 the weights stay at w_0 for that many steps while Ê is averaged into
the baseline (the paper's App. C.1 collects statistics for 3 epochs). ``param`` mode only: S
accumulates over steps, and in ``rep`` mode its coordinates would be other samples' features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.full_jacobian import JacobianMethod

CONVENTIONS = ("libmtl", "torchjd")


class ExcessMTL(JacobianMethod):
    """ExcessMTL.

    Args:
        num_tasks: T (filled in by the framework).
        robust_step_size: η of the exponentiated step (LibMTL 1e-2; TorchJD 1.0).
        warmup_steps: steps that only collect the baseline Ê⁰ (0: the first step's Ê).
        convention: ``libmtl`` (Σw = T, w_0 = 1) or ``torchjd`` (Σw = 1, w_0 = 1/T).
        mode: only ``param``.
    """

    stateful = True
    lazy_buffers = ("squared_sum",)

    def __init__(
        self,
        num_tasks: int,
        robust_step_size: float = 1e-2,
        warmup_steps: int = 0,
        convention: str = "libmtl",
        mode: str = "param",
    ) -> None:
        super().__init__(mode)
        if convention not in CONVENTIONS:
            raise ValueError(f"balancer.convention={convention!r}; expected one of {CONVENTIONS}")
        if robust_step_size <= 0:
            raise ValueError(f"balancer.robust_step_size={robust_step_size}; expected > 0")
        if warmup_steps < 0:
            raise ValueError(f"balancer.warmup_steps={warmup_steps}; expected >= 0")
        self.robust_step_size, self.warmup_steps = robust_step_size, int(warmup_steps)
        self.convention = convention
        self.total = float(num_tasks) if convention == "libmtl" else 1.0  # Σw
        self.register_buffer("task_weights", torch.full((num_tasks,), self.total / num_tasks))
        self.register_buffer("squared_sum", torch.zeros(0, 0))  # T x P, sized at the first step
        self.register_buffer("baseline", torch.zeros(num_tasks))
        self.register_buffer("warmup_sum", torch.zeros(num_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        if self.squared_sum.shape != jacobian.shape:
            self.squared_sum = torch.zeros_like(jacobian)
        squared = jacobian.square()
        self.squared_sum += squared
        excess = (squared / (self.squared_sum + 1e-7).sqrt()).sum(dim=1).to(self.baseline)
        self.steps += 1
        step = int(self.steps)
        if step <= self.warmup_steps:
            self.warmup_sum += excess
        else:
            if step == self.warmup_steps + 1:  # the baseline's step
                if self.warmup_steps:
                    self.baseline.copy_(self.warmup_sum / self.warmup_steps)
                else:
                    self.baseline.copy_(excess)
            self._update(excess, first=step == 1)
        weights = self.task_weights
        return weights.to(jacobian) @ jacobian, weights.clone()

    def _update(self, excess: Tensor, first: bool) -> None:
        if first and self.convention == "libmtl":
            return  # LibMTL only records the baseline on its first call
        ratio = excess if first else excess / (self.baseline + 1e-7)
        # w · exp(η r) renormalised, in log space: saturates instead of overflowing
        logits = self.task_weights.log() + self.robust_step_size * ratio
        self.task_weights.copy_(self.total * torch.softmax(logits, dim=0))

    def head_scales(self, losses: Tensor, weights: Tensor) -> Tensor | None:
        return weights.to(losses) if self.convention == "libmtl" else None
