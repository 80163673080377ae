"""Bases of the methods that need the whole T x P Jacobian of the task gradients, not only its
Gramian: coordinate-wise aggregators (GradDrop, TrimmedMean), methods that keep a state in
parameter space (DB-MTL, MoCo, ExcessMTL) and methods that need the Jacobians of independent
mini-batches (MoDo, SDMGrad).

Under DDP the Jacobian rows are averaged over processes before the method sees them
(`TaskGradients.compute`), and the losses are averaged too, so every process runs the same
deterministic computation on the same numbers: T x P states are identical on every rank.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult
from mtl.balancers.jacobian import (
    TaskGradients,
    backward_through_features,
    feature_gradients,
    gramian,
)


class JacobianMethod(Balancer):
    """Per-task gradients on the shared parameters, one update from the whole Jacobian.

    Subclasses implement `aggregate` (and, for ``rep`` mode, may override
    `aggregate_features`). Class attributes the configuration check reads:

    Attributes:
        modes: the ``balancer.mode`` values the method supports.
        stateful: the method keeps a per-step state (or needs several mini-batches), so it
            cannot aggregate a second Jacobian of the same step (flat regions aggregate two).
        splits_batch: the method splits each process's batch into ``parts`` parts.
        needs_full_jacobian: the update is not a function of the Gramian alone.
    """

    needs_task_gradients = True
    needs_full_jacobian = True
    modes: tuple[str, ...] = ("param",)
    stateful = False
    splits_batch = False
    #: Buffers whose size is known only at the first step (T x P states): a checkpoint's
    #: tensors are loaded whatever their size.
    lazy_buffers: tuple[str, ...] = ()

    def __init__(self, mode: str = "param") -> None:
        super().__init__()
        if mode not in self.modes:
            raise ValueError(
                f"balancer.mode={mode!r}: {type(self).__name__} supports only "
                f"{' or '.join(repr(m) for m in self.modes)}"
            )
        self.mode = mode

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], num_tasks: int) -> list[str]:
        """Problems of the method's own options given the number of tasks (config check)."""
        return []

    def aggregate(
        self, jacobian: Tensor, losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        """(shared update, reported task weights) from the T x P Jacobian and the T losses
        (both averaged over processes); stateful methods advance their state here."""
        raise NotImplementedError

    def head_scales(self, losses: Tensor, weights: Tensor) -> Tensor | None:
        """Factors of each head's gradient (None: the head gets its own task's gradient)."""
        return None

    @property
    def uses_representation(self) -> bool:
        return self.mode == "rep"

    def aggregate_features(
        self, local: Tensor, leaves: list[Tensor], losses: Tensor, context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        """``rep`` mode: (feature gradient, reported weights) from this process's T x F
        Jacobian of the losses with respect to the features the heads decoded from (`leaves`,
        first axis the batch). The default applies `aggregate` to it, which is exact under DDP
        for rules that act on each feature coordinate alone and are positively homogeneous."""
        return self.aggregate(local, losses, context)

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        if self.mode == "rep":
            return self._backward_rep(losses, context)
        grads = TaskGradients.compute(losses, context)
        if self.stateful and not bool(grads.jacobian.isfinite().all()):
            return _untouched_state(losses, grads, context)
        values = global_losses(losses, context).to(grads.jacobian)
        update, weights = self.aggregate(grads.jacobian, values, context)
        scales = self.head_scales(values, weights)
        if scales is not None:
            grads.heads = {t: h * s for (t, h), s in zip(grads.heads.items(), scales, strict=True)}
        grads.write(update, context)
        return BalanceResult(
            dict(zip(losses, weights.tolist(), strict=True)), gramian(grads.jacobian)
        )

    def _backward_rep(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        grads = feature_gradients(losses, context)
        values = global_losses(losses, context).to(grads.jacobian)
        feature_grad, weights = self.aggregate_features(
            grads.jacobian, grads.leaves, values, context
        )
        parts = feature_grad.split([leaf.numel() for leaf in grads.leaves])
        backward_through_features(grads, parts, context)
        return BalanceResult(dict(zip(losses, weights.tolist(), strict=True)), None)

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        if self.stateful:
            raise ValueError(
                f"{type(self).__name__} keeps a state that advances once per step, so it cannot "
                "aggregate a second Jacobian of the same step (flat=sam|asam); use flat=none"
            )
        return self.aggregate(jacobian, global_losses(losses, context).to(jacobian), context)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in self.lazy_buffers:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                setattr(self, name, current.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _untouched_state(
    losses: Mapping[str, Tensor], grads: TaskGradients, context: BalanceContext
) -> BalanceResult:
    """A non-finite task gradient: write the plain sum (non-finite too, so the training step
    skips the step) and leave the method's state as it was, not poisoned for later steps."""
    grads.write(grads.jacobian.sum(dim=0), context)
    return BalanceResult(dict.fromkeys(losses, float("nan")), gramian(grads.jacobian))


def global_losses(losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
    """The T losses of the global batch (averaged over processes), detached."""
    values = torch.stack([loss.detach() for loss in losses.values()])
    return context.all_reduce_mean(values) if context.world_size > 1 else values


def project_onto_simplex(y: Tensor) -> Tensor:
    """Euclidean projection onto the probability simplex (sort-based, Held et al. 1974)."""
    ordered = torch.sort(y, descending=True).values
    cumulative = ordered.cumsum(0) - 1.0
    index = torch.arange(1, len(y) + 1, dtype=y.dtype, device=y.device)
    active = ordered - cumulative / index > 0
    last = int(active.nonzero().max())
    return (y - cumulative[last] / (last + 1)).clamp_min(0.0)


#: Columns per block of `cross_gramian`.
CROSS_BLOCK = 1 << 20


@torch.no_grad()
def cross_gramian(first: Tensor, second: Tensor) -> Tensor:
    """J₁ J₂ᵀ in float64 on the CPU, formed over column blocks (no float64 copy of J)."""
    total = torch.zeros(first.shape[0], second.shape[0], dtype=torch.float64)
    for start in range(0, first.shape[1], CROSS_BLOCK):
        a, b = first[:, start : start + CROSS_BLOCK], second[:, start : start + CROSS_BLOCK]
        total += (a.double() @ b.double().T).cpu()
    return total


class MultiBatchMethod(JacobianMethod):
    """Methods whose weights come from the Jacobians of two independent mini-batches.

    The training step's batch is split along its first axis into ``parts`` consecutive parts
    (2 or 3; each process splits its own batch), the losses are recomputed on each part (one
    extra forward pass and T backward passes per part) and each part's Jacobian is averaged over
    processes. The weights come from the cross-matrix J₁J₂ᵀ of parts 1 and 2 (identical on every
    process); the shared update is J₃ᵀw with 3 parts, or ((J₁ + J₂)/2)ᵀw with 2. Each head gets
    the sum or the mean over the parts of its own task's gradient (``head_reduction``).
    """

    stateful = True
    splits_batch = True

    def __init__(self, parts: int = 3, head_reduction: str = "mean", mode: str = "param") -> None:
        super().__init__(mode)
        if parts not in (2, 3):
            raise ValueError(f"balancer.parts={parts}; expected 2 or 3")
        if head_reduction not in ("mean", "sum"):
            raise ValueError(f"balancer.head_reduction={head_reduction!r}; expected mean or sum")
        self.parts, self.head_reduction = int(parts), head_reduction

    def weights_from(self, cross: Tensor) -> Tensor:
        """Task weights (float64, CPU) from J₁J₂ᵀ (float64, CPU); advances the state."""
        raise NotImplementedError

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        raise ValueError(
            f"{type(self).__name__} needs independent mini-batches, not one Jacobian "
            "(it cannot be wrapped by flat=sam|asam); use flat=none"
        )

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        if context.part_losses is None:
            raise ValueError(
                f"{type(self).__name__} needs the training step to recompute the losses on parts "
                "of the batch (BalanceContext.part_losses)"
            )
        parts = [TaskGradients.compute(p, context) for p in context.part_losses(self.parts)]
        if self.parts == 3:
            direction = parts[2].jacobian
        else:
            direction = (parts[0].jacobian + parts[1].jacobian) / 2
        divisor = len(parts) if self.head_reduction == "mean" else 1
        heads = {t: sum(p.heads[t] for p in parts) / divisor for t in parts[0].heads}
        grads = TaskGradients(direction, heads)
        cross = cross_gramian(parts[0].jacobian, parts[1].jacobian)
        if not (bool(cross.isfinite().all()) and bool(direction.isfinite().all())):
            return _untouched_state(losses, grads, context)
        weights = self.weights_from(cross)
        grads.write(weights.to(direction) @ direction, context)
        return BalanceResult(dict(zip(losses, weights.tolist(), strict=True)), gramian(direction))


def config_problems(
    method: type,
    options: Mapping[str, Any],
    num_tasks: int,
    per_process_batch: int | None,
    flat: bool,
) -> list[str]:
    """What makes a `JacobianMethod` unusable with a configuration, one line per problem naming
    the key to change, before anything is built (``[]`` for other balancers).

    Args:
        method: the class ``balancer._target_`` names.
        options: the ``balancer`` node.
        num_tasks: the number of tasks (``data.tasks``).
        per_process_batch: ``data.batch_size`` divided by the number of processes (None when
            unknown).
        flat: whether a flat-region method (``flat=sam|asam``) wraps the balancer.
    """
    if not (isinstance(method, type) and issubclass(method, JacobianMethod)):
        return []
    name, problems = method.__name__, []
    mode = options.get("mode", "param")
    if mode not in method.modes:
        problems.append(
            f"balancer.mode: {mode!r}; {name} supports only "
            f"{' or '.join(repr(m) for m in method.modes)}: its state or cross-matrix would pair "
            "the features of different samples (use balancer.mode=param)"
        )
    if options.get("jacobian", "stored") == "streamed":
        problems.append(
            f"balancer.jacobian: 'streamed' never holds the T x P Jacobian, but {name} needs all "
            "of it (its update is not a function of the task gradients' Gramian); use "
            "balancer.jacobian=stored"
        )
    if flat and method.stateful:
        problems.append(
            f"flat: {name} keeps a state that advances once per step (or needs several "
            "mini-batches), so it cannot aggregate the flat part of the step too; use flat=none"
        )
    if method.splits_batch and per_process_batch is not None:
        default = inspect.signature(method).parameters["parts"].default
        parts = options.get("parts", default)
        if isinstance(parts, int) and per_process_batch < parts:
            problems.append(
                f"data.batch_size: {name} splits each process's batch into {parts} independent "
                f"parts (balancer.parts), but a process gets {per_process_batch} sample(s); "
                f"use at least {parts} per process"
            )
    return problems + method.option_problems(options, num_tasks)
