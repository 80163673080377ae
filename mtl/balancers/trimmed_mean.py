"""TrimmedMean: coordinate-wise trimmed mean of the task gradients [Yin et al., ICML 2018].

For every shared coordinate the T task values are sorted, the k largest and the k smallest are
dropped and the remaining T − 2k averaged (mean convention, as TorchJD). A Byzantine-robust
aggregator built for many workers: with T tasks it needs T ≥ 2k + 1. In ``rep`` mode the same
rule acts on the gradients with respect to the shared features (each sample's feature
coordinate alone: exact under DDP).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        if problems := self.option_problems({"trim_number": trim_number}, num_tasks):
            raise ValueError(problems[0])
        self.trim_number = int(trim_number)

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], num_tasks: int) -> list[str]:
        k = options.get("trim_number", 1)
        if not isinstance(k, int) or k < 0:
            return [f"balancer.trim_number: {k!r}; expected a non-negative integer"]
        if num_tasks < 2 * k + 1:
            return [
                f"balancer.trim_number: {k}; trimming {k} values at each end needs at least "
                f"{2 * k + 1} tasks and data.tasks has {num_tasks}"
            ]
        return []

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        tasks, k = jacobian.shape[0], self.trim_number
        ordered = torch.sort(jacobian, dim=0)
        update = ordered.values[k : tasks - k].mean(dim=0)
        # Reported weights: how often each task's value is kept, times 1 / (T − 2k): sum 1.
        kept = torch.bincount(ordered.indices[k : tasks - k].reshape(-1), minlength=tasks)
        return update, kept.double().cpu() / max((tasks - 2 * k) * jacobian.shape[1], 1)
