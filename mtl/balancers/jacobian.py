"""Per-task gradients on the shared parameters, exact under DDP.

``torch.autograd.grad`` never triggers DDP's gradient averaging, so the per-task gradients of
each process are packed into one buffer and averaged with a single all-reduce; every process then
runs the same deterministic aggregation on the same numbers and writes ``.grad`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext


def flatten(
    grads: Sequence[Tensor | None], params: Sequence[nn.Parameter], out: Tensor | None = None
) -> Tensor:
    """One vector from per-parameter gradients (``None``: the loss does not use it), written
    into ``out`` when given (a row of a preallocated Jacobian: no second copy)."""
    if not params:
        return torch.zeros(0) if out is None else out
    parts = [
        (torch.zeros_like(p) if g is None else g).reshape(-1)
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def empty_jacobian(rows: int, params: Sequence[Tensor]) -> Tensor:
    """An uninitialised ``rows`` x (elements of `params`) buffer for task gradients with
    respect to them (parameters, or the shared features in ``rep`` mode)."""
    first = params[0] if params else torch.zeros(0)
    return first.new_empty(rows, sum(p.numel() for p in params))


def write_gradients(params: Sequence[nn.Parameter], vector: Tensor) -> None:
    """Set ``.grad`` of `params` from one flat vector (the inverse of `flatten`)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vector[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


#: Columns per block of `gramian`.
GRAMIAN_BLOCK = 4096


@torch.no_grad()
def gramian(jacobian: Tensor) -> Tensor:
    """G = J Jᵀ in float64 on the CPU (solvers run there, deterministically).

    Products of column blocks are formed in float32 (float64 for a float64 J; one batched
    matmul) and summed in float64: within about 1e-8 of the float64 product, at a tenth of its
    time, and without a float64 copy of J (T x P floats, P the shared parameters).
    """
    j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
    rows, cols = j.shape
    whole = cols // GRAMIAN_BLOCK * GRAMIAN_BLOCK
    blocks = j[:, :whole].reshape(rows, -1, GRAMIAN_BLOCK).transpose(0, 1)  # n x T x block
    rest = j[:, whole:]
    total = torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(0)
    return (total + (rest @ rest.T).double()).cpu()


class FeatureGradients(NamedTuple):
    """``rep`` mode's per-task gradients: with respect to the features the heads decoded from,
    and each head's own gradient."""

    features: list[Tensor]  # the shared features (part of the backbone's graph)
    leaves: list[Tensor]  # their detached copies the heads decoded from
    jacobian: Tensor  # T x (elements of the leaves on this process), rows in task order
    heads: dict[str, list[Tensor]]  # task -> gradient of each of its own parameters


def feature_gradients(losses: Mapping[str, Tensor], context: BalanceContext) -> FeatureGradients:
    """T backward passes that stop at the heads' inputs (each covers its task's head only),
    the graph kept for the one backward through the backbone that follows."""
    if context.features is None or context.head_inputs is None:
        raise ValueError(
            "balancer.mode=rep needs the shared features and the detached copies the heads "
            "decoded from (MultiTaskModel.decode(..., detach_features=True))"
        )
    features, leaves = list(context.features), list(context.head_inputs)
    local, heads = empty_jacobian(len(losses), leaves), {}
    for i, (task, loss) in enumerate(losses.items()):
        own = list(context.task_params.get(task, ()))
        grads = torch.autograd.grad(loss, leaves + own, retain_graph=True, allow_unused=True)
        flatten(grads[: len(leaves)], leaves, out=local[i])
        heads[task] = [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads[len(leaves) :], own, strict=True)
        ]
    return FeatureGradients(features, leaves, local, heads)


def backward_through_features(
    grads: FeatureGradients, parts: Sequence[Tensor], context: BalanceContext
) -> None:
    """One framework backward whose gradients are the chosen feature gradient (`parts`, one
    per feature level) through the backbone and each head's own gradient, so that DDP averages
    all of it as usual: the backward of a surrogate linear in the features and the heads."""
    surrogate = sum(
        (f * g.view_as(f)).sum() for f, g in zip(grads.features, parts, strict=True)
    )
    for task, own_grads in grads.heads.items():
        own = context.task_params.get(task, ())
        surrogate = surrogate + sum((p * g).sum() for p, g in zip(own, own_grads, strict=True))
    context.backward(surrogate)


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
        tasks = list(losses)
        jacobian, heads = empty_jacobian(len(tasks), shared), {}
        for i, task in enumerate(tasks):
            own = list(context.task_params.get(task, ()))
            keep = retain_graph or i < len(tasks) - 1
            grads = torch.autograd.grad(
                losses[task], shared + own, retain_graph=keep, allow_unused=True
            )
            flatten(grads[: len(shared)], shared, out=jacobian[i])
            heads[task] = flatten(grads[len(shared) :], own)
        result = cls(jacobian, heads)
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
