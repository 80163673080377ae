"""GradDrop: gradient sign dropout [Chen et al., NeurIPS 2020], on the Jacobian (TorchJD's form).

For every shared coordinate j the positive-sign purity P_j = ½(1 + Σ_t J_tj / Σ_t |J_tj|) is
compared with a uniform draw U_j: if P_j > U_j only the positive entries of column j are kept,
if P_j < U_j only the negative ones. With a leak ℓ_t a task keeps that fraction of its dropped
entries: d = Σ_t (ℓ_t + (1 − ℓ_t) M_t) ⊙ g_t (sum over tasks).

U comes from a generator seeded by (seed, step), so every process draws the same numbers and,
on the all-reduced Jacobian, writes the same update. The paper's (and LibMTL's) form, which
weights the purity by the sign of the layer input and sums it over the batch, is not provided:
``param`` mode only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.full_jacobian import JacobianMethod


class GradDrop(JacobianMethod):
    """GradDrop with f = identity.

    Args:
        leak: ℓ, one number for every task or one per task (in ``data.tasks`` order); 0 drops
            fully (the paper's and both references' default).
        mode: only ``param``.
    """

    def __init__(self, leak: float | Sequence[float] = 0.0, mode: str = "param") -> None:
        super().__init__(mode)
        self.leak = [float(leak)] if isinstance(leak, int | float) else [float(x) for x in leak]
        if any(not 0.0 <= x <= 1.0 for x in self.leak):
            raise ValueError(f"balancer.leak={leak}; expected numbers in [0, 1]")

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        tasks = jacobian.shape[0]
        if len(self.leak) not in (1, tasks):
            raise ValueError(
                f"balancer.leak has {len(self.leak)} values; expected one or one per task ({tasks})"
            )
        leak = torch.tensor(self.leak * (tasks // len(self.leak)), dtype=jacobian.dtype)
        leak = leak.to(jacobian.device)
        total, magnitude = jacobian.sum(dim=0), jacobian.abs().sum(dim=0)
        # An all-zero column contributes nothing whatever its purity: use ½ there, not 0/0.
        purity = 0.5 * (1.0 + total / torch.where(magnitude > 0, magnitude, 1.0))
        draws = torch.rand(jacobian.shape[1], generator=context.generator(), dtype=jacobian.dtype)
        draws = draws.to(jacobian.device)
        keep_positive, keep_negative = purity > draws, purity < draws
        mask = keep_positive & (jacobian > 0) | keep_negative & (jacobian < 0)
        update = ((leak[:, None] + (1.0 - leak[:, None]) * mask) * jacobian).sum(dim=0)
        # Reported weights: the kept share of each task's gradient coordinates.
        kept = leak + (1.0 - leak) * mask.sum(dim=1) / max(jacobian.shape[1], 1)
        return update, kept.double().cpu()
