"""GradNorm [Chen et al., ICML 2018]: learnable loss weights that equalise the tasks' training
rates through their gradient norms (LibMTL ``GradNorm.py``).

w = T·softmax(ξ), ξ₀ = 1 (so w₀ = 1 and Σw = T always). In the first epoch the update is the
plain sum and the mean loss of every task over that epoch is recorded (L̄_t(0)). From the next
epoch on, with n_t = ‖g_t‖ the task's gradient norm, G_t = w_t·n_t, Ḡ = mean_t G_t, the inverse
training rate r_t = L̃_t / mean(L̃) of L̃_t = L_t / L̄_t(0), the weights' loss is
L_grad = Σ_t |G_t − sg(Ḡ·r_t^α)|; its gradient goes to ξ only, and ξ is stepped by the model's
optimiser (it is a parameter of the balancer). The shared update is Σ_t sg(w_t)·g_t; each head
gets its own task's unweighted gradient (as in LibMTL, where the heads see the per-task
backward passes).

Only diag(G) is needed, so it is a Gramian method: ``param`` mode takes the norms over all
shared parameters (LibMTL), ``rep`` mode over the shared representation (LibMTL ``rep_grad``;
the paper uses the last shared layer). Under DDP the norms come from the all-reduced Gramian and
the losses are averaged over processes, so ξ's gradient is identical on every process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext, BalanceResult
from mtl.balancers.gramian import GramianMethod
from mtl.balancers.scalariser import global_losses


class GradNorm(GramianMethod):
    """GradNorm with weights T·softmax(ξ).

    Args:
        num_tasks: T.
        alpha: strength α of the pull toward equal training rates (1.5, LibMTL and the paper's
            NYUv2 setting).
        init_logit: ξ₀ for every task (LibMTL: 1; any equal value gives w₀ = 1).
        mode: ``param`` or ``rep``.
    """

    def __init__(
        self, num_tasks: int, alpha: float = 1.5, init_logit: float = 1.0, mode: str = "param"
    ) -> None:
        super().__init__(mode)
        if alpha < 0:
            raise ValueError(f"balancer.alpha={alpha}; expected a non-negative number")
        self.alpha = float(alpha)
        self.logits = nn.Parameter(torch.full((num_tasks,), float(init_logit)))
        self.register_buffer("initial_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("initial_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("initial_epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))
        # this step's (global) losses and the norms of the first Jacobian combined after them
        self._losses: Tensor | None = None
        self._norms: Tensor | None = None

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        """Record the first epoch's mean losses; GradNorm starts with the next epoch."""
        self._losses, self._norms = global_losses(losses, context), None
        if self.active:
            return
        if self.initial_epoch < 0:
            self.initial_epoch.fill_(context.epoch)
        if context.epoch == int(self.initial_epoch):
            self.initial_sum += self._losses
            self.initial_count += 1
        else:
            self.active.fill_(True)

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        if self._norms is None:  # the plain task gradients (flat regions combine more later)
            self._norms = gram.diagonal().clamp_min(0).sqrt()
        if not self.active:
            return torch.ones(gram.shape[0], dtype=torch.float64)
        return len(self.logits) * torch.softmax(self.logits.detach().double(), 0)

    def logit_gradient(self) -> Tensor:
        """∂L_grad/∂ξ at this step's norms and losses (zero before GradNorm starts)."""
        if not self.active or self._norms is None or self._losses is None:
            return torch.zeros_like(self.logits)
        with torch.enable_grad():
            logits = self.logits.detach().double().cpu().requires_grad_(True)
            scaled = len(logits) * torch.softmax(logits, 0) * self._norms  # G_t = w_t·n_t
            rate = self._losses / (self.initial_sum / self.initial_count)  # L̃_t
            target = (scaled.mean() * (rate / rate.mean()) ** self.alpha).detach()
            (grad,) = torch.autograd.grad((scaled - target).abs().sum(), logits)
        return grad.to(self.logits)

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        self.observe(losses, context)
        used_backward = []

        def backward_with_logits(total: Tensor) -> None:
            # rep mode ends in one framework backward: ξ's gradient joins it (a linear term
            # whose gradient is that value), so DDP averages it like every other gradient.
            used_backward.append(True)
            context.backward(total + (self.logits * self.logit_gradient()).sum())

        result = super().backward(losses, replace(context, backward=backward_with_logits))
        if not used_backward:  # param mode: the Gramian method wrote .grad itself
            self.write_own_gradients(losses, context)
        return result

    def write_own_gradients(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        self.logits.grad = self.logit_gradient() if self.active else None
