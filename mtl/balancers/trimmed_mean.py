"""TrimmedMean: coordinate-wise trimmed mean of the task gradients [Yin et al., ICML 2018].

For every shared coordinate the T task values are sorted, the k largest and the k smallest are
dropped and the remaining T − 2k averaged (mean convention, as TorchJD). A Byzantine-robust
aggregator built for many workers: with T tasks it needs T ≥ 2k + 1. In ``rep`` mode the same
rule acts on the gradients with respect to the shared features (each sample's feature
coordinate alone: exact under DDP).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.full_jacobian import JacobianMethod


class TrimmedMean(JacobianMethod):
    """TrimmedMean.

    Args:
        num_tasks: T (filled in by the framework).
        trim_number: k, values dropped at each end of every coordinate.
        mode: ``param`` (shared parameters) or ``rep`` (shared features).
    """

    modes = ("param", "rep")

    def __init__(self, num_tasks: int, trim_number: int = 1, mode: str = "param") -> None:
        super().__init__(mode)
        if trim_number < 0 or num_tasks < 2 * trim_number + 1:
            raise ValueError(
                f"balancer.trim_number={trim_number}: trimming {trim_number} values at each end "
                f"needs at least {2 * trim_number + 1} tasks and data.tasks has {num_tasks}"
            )
        self.trim_number = int(trim_number)

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        tasks, k = jacobian.shape[0], self.trim_number
        ordered = torch.sort(jacobian, dim=0)
        update = ordered.values[k : tasks - k].mean(dim=0)
        # Reported weights: how often each task's value is kept, times 1 / (T − 2k): sum 1.
        kept = torch.bincount(ordered.indices[k : tasks - k].reshape(-1), minlength=tasks)
        return update, kept.double().cpu() / max((tasks - 2 * k) * jacobian.shape[1], 1)
