"""Per-task gradients on the shared parameters, exact under DDP.

``torch.autograd.grad`` never triggers DDP's gradient averaging, so the per-task gradients of
each process are packed into one buffer and averaged with a single all-reduce; every process then
runs the same deterministic aggregation on the same numbers and writes ``.grad`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext


def flatten(grads: Sequence[Tensor | None], params: Sequence[nn.Parameter]) -> Tensor:
    """One vector from per-parameter gradients (``None``: the loss does not use it)."""
    if not params:
        return torch.zeros(0)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def write_gradients(params: Sequence[nn.Parameter], vector: Tensor) -> None:
    """Set ``.grad`` of `params` from one flat vector (the inverse of `flatten`)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vector[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


@torch.no_grad()
def gramian(jacobian: Tensor) -> Tensor:
    """G = J Jᵀ in float64 on the CPU (solvers run there, deterministically)."""
    j = jacobian.double()
    return (j @ j.T).cpu()


class TaskGradients:
    """The per-task gradients of one step: shared Jacobian rows and each head's own gradient."""

    def __init__(self, jacobian: Tensor, heads: dict[str, Tensor]) -> None:
        self.jacobian = jacobian  # T x P_shared, rows in task order
        self.heads = heads  # task -> flat gradient of its own parameters

    @classmethod
    def compute(
        cls, losses: Mapping[str, Tensor], context: BalanceContext, retain_graph: bool = False
    ) -> TaskGradients:
        """T backward passes with ``autograd.grad``, then one all-reduce of everything."""
        shared = list(context.shared_params)
        rows, heads = [], {}
        tasks = list(losses)
        for i, task in enumerate(tasks):
            own = list(context.task_params.get(task, ()))
            keep = retain_graph or i < len(tasks) - 1
            grads = torch.autograd.grad(
                losses[task], shared + own, retain_graph=keep, allow_unused=True
            )
            rows.append(flatten(grads[: len(shared)], shared))
            heads[task] = flatten(grads[len(shared) :], own)
        result = cls(torch.stack(rows), heads)
        return result.all_reduced(context) if context.world_size > 1 else result

    def all_reduced(self, context: BalanceContext) -> TaskGradients:
        """The same gradients averaged over processes, in one collective call."""
        sizes = [h.numel() for h in self.heads.values()]
        packed = context.all_reduce_mean(
            torch.cat([self.jacobian.reshape(-1), *self.heads.values()])
        )
        jacobian, *heads = packed.split([self.jacobian.numel(), *sizes])
        return TaskGradients(
            jacobian.view_as(self.jacobian), dict(zip(self.heads, heads, strict=True))
        )

    def write(self, shared_update: Tensor, context: BalanceContext) -> None:
        """`.grad` of the shared parameters from the update, of each head from its own task."""
        write_gradients(context.shared_params, shared_update)
        for task, grad in self.heads.items():
            write_gradients(context.task_params.get(task, ()), grad)
