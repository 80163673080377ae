"""GradDrop: gradient sign dropout [Chen et al., NeurIPS 2020], on the Jacobian (TorchJD's form).

For every shared coordinate j the positive-sign purity P_j = ½(1 + Σ_t J_tj / Σ_t |J_tj|) is
compared with a uniform draw U_j: if P_j > U_j only the positive entries of column j are kept,
if P_j < U_j only the negative ones. With a leak ℓ_t a task keeps that fraction of its dropped
entries: d = Σ_t (ℓ_t + (1 − ℓ_t) M_t) ⊙ g_t (sum over tasks).

In ``rep`` mode the paper's (and LibMTL's) form acts on the gradients with respect to the shared
features Z: the purity of feature position j (every axis but the batch) uses the batch sums
G_tj = Σ_b ∂L_t/∂Z_bj · sign(Z_bj) (summed over processes too), P_j = ½(1 + Σ_t G_tj /
(Σ_t |G_tj| + 1e-7)), the mask M_tj = [P_j > U_j][G_tj > 0] + [P_j < U_j][G_tj < 0] is applied to
every sample's gradient at j, and the masked gradients are summed over tasks and backpropagated
through the backbone once.

U comes from a generator seeded by (seed, step), so every process draws the same numbers and,
on the all-reduced Jacobian (``param``) or batch sums (``rep``), writes the same update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.full_jacobian import JacobianMethod


class GradDrop(JacobianMethod):
    """GradDrop with f = identity.

    Args:
        leak: ℓ, one number for every task or one per task (in ``data.tasks`` order); 0 drops
            fully (the paper's and both references' default).
        mode: ``param`` (TorchJD's form on the shared parameters) or ``rep`` (the paper's and
            LibMTL's form on the shared features).
    """

    modes = ("param", "rep")

    def __init__(self, leak: float | Sequence[float] = 0.0, mode: str = "param") -> None:
        super().__init__(mode)
        self.leak = [float(leak)] if isinstance(leak, int | float) else [float(x) for x in leak]
        if any(not 0.0 <= x <= 1.0 for x in self.leak):
            raise ValueError(f"balancer.leak={leak}; expected numbers in [0, 1]")

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        tasks = jacobian.shape[0]
        leak = self._leak(tasks, jacobian)
        total, magnitude = jacobian.sum(dim=0), jacobian.abs().sum(dim=0)
        # An all-zero column contributes nothing whatever its purity: use ½ there, not 0/0.
        purity = 0.5 * (1.0 + total / torch.where(magnitude > 0, magnitude, 1.0))
        draws = _uniform(jacobian.shape[1], jacobian, context)
        keep_positive, keep_negative = purity > draws, purity < draws
        mask = keep_positive & (jacobian > 0) | keep_negative & (jacobian < 0)
        update = ((leak[:, None] + (1.0 - leak[:, None]) * mask) * jacobian).sum(dim=0)
        # Reported weights: the kept share of each task's gradient coordinates.
        kept = leak + (1.0 - leak) * mask.sum(dim=1) / max(jacobian.shape[1], 1)
        return update, kept.double().cpu()

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], num_tasks: int) -> list[str]:
        leak = options.get("leak", 0.0)
        values = [leak] if isinstance(leak, int | float) else list(leak)
        if len(values) not in (1, num_tasks) or any(
            isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x <= 1 for x in values
        ):
            return [
                f"balancer.leak: {values if len(values) > 1 else leak!r}; expected a number in "
                f"[0, 1] or one per task ({num_tasks}, in data.tasks order)"
            ]
        return []

    def _leak(self, tasks: int, like: Tensor) -> Tensor:
        if problems := self.option_problems({"leak": self.leak}, tasks):
            raise ValueError(problems[0])
        leak = torch.tensor(self.leak * (tasks // len(self.leak)), dtype=like.dtype)
        return leak.to(like.device)

    def aggregate_features(
        self, local: Tensor, leaves: list[Tensor], losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        tasks, batch = local.shape[0], leaves[0].shape[0]
        # Per level: the gradients (T x B x positions) and the features they flow into.
        split = local.split([x.numel() for x in leaves], dim=1)
        parts = [
            (part.view(tasks, batch, -1), leaf.detach().reshape(1, batch, -1))
            for part, leaf in zip(split, leaves, strict=True)
        ]
        sums = torch.cat([(g * z.sign()).sum(dim=1) for g, z in parts], dim=1)  # T x positions
        if context.world_size > 1:  # the sum over the global batch, up to a common factor
            sums = context.all_reduce_mean(sums)
        purity = 0.5 * (1.0 + sums.sum(dim=0) / (sums.abs().sum(dim=0) + 1e-7))
        draws = _uniform(sums.shape[1], sums, context)
        mask = (purity > draws) & (sums > 0) | (purity < draws) & (sums < 0)
        leak = self._leak(tasks, local)[:, None]
        factor = leak + (1.0 - leak) * mask  # T x positions
        pieces, start = [], 0
        for g, _ in parts:
            width = g.shape[2]
            pieces.append((g * factor[:, None, start : start + width]).sum(dim=0).reshape(-1))
            start += width
        return torch.cat(pieces), factor.mean(dim=1).double().cpu()


def _uniform(size: int, like: Tensor, context: BalanceContext) -> Tensor:
    """U(0, 1) draws on `like`'s device from the step's seed: the same on every process (of one
    device type), without drawing P numbers on the CPU and copying them over."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(context.generator().initial_seed())
    return torch.rand(size, generator=generator, dtype=like.dtype, device=like.device)
