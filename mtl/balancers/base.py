"""The balancer interface.

A balancer receives the per-task losses (already multiplied by their static weights) and writes
the gradients of one update into ``.grad``: the shared parameters get the balanced update, each
task-specific parameter the gradient of its own task's loss. The training step only calls
``balancer.backward(losses, context)`` and then steps the optimiser, so loss weighting, gradient
surgery and sharpness-aware wrappers all plug in without touching the training step.

Every balancer can also *aggregate* a given Jacobian of task gradients (``combine``); the
sharpness-aware wrapper uses that to apply the same method to the plain and to the flat parts.

Balancers are ``nn.Module``s so that learnable weights (e.g. uncertainty weighting) are
optimised with the model and any state lands in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class BalanceContext:
    """What a balancer may use besides the losses, for one training step.

    Attributes:
        shared_params: parameters all tasks share (the backbone).
        task_params: per task, the parameters only that task uses (its head).
        backward: the framework's backward (Lightning's ``manual_backward``), which also
            averages gradients across processes under DDP.
        recompute_losses: re-runs the forward pass on the same batch for the given tasks (all
            when None) and returns fresh losses (sharpness-aware methods evaluate perturbed
            weights with it).
        all_reduce_mean: averages a tensor over processes (identity on one process).
        step: the global optimiser step.
        epoch: the current epoch.
        seed: the run's seed (with ``step``, seeds any randomness identically on every rank).
        world_size: number of processes sharing the global batch.
        features: the shared representation the losses were computed from (``rep`` mode).
        head_inputs: the detached leaf copies of ``features`` the heads decoded from, when the
            balancer `uses_representation` (see ``MultiTaskModel.decode``).
        model: the model (for methods that must handle its normalisation statistics).
        stem: the output of the backbone's high-resolution stem (a CNN's first convolutions
            and pooling), through which every path from ``features`` to ``stem_params``
            passes; None where the backbone has none or it was not kept.
        stem_params: the shared parameters that act before ``stem``.
        part_losses: re-runs the forward pass on ``n`` consecutive parts of the batch (split
            along its first axis) and returns each part's losses, for methods that need
            independent mini-batches; raises ``ValueError`` naming ``data.batch_size`` when the
            batch has fewer than ``n`` samples.
    """

    shared_params: Sequence[nn.Parameter]
    task_params: Mapping[str, Sequence[nn.Parameter]]
    backward: Callable[[Tensor], None]
    recompute_losses: Callable[[Sequence[str] | None], dict[str, Tensor]]
    all_reduce_mean: Callable[[Tensor], Tensor]
    step: int = 0
    epoch: int = 0
    seed: int = 0
    world_size: int = 1
    features: Sequence[Tensor] | None = None
    head_inputs: Sequence[Tensor] | None = None
    model: nn.Module | None = None
    part_losses: Callable[[int], list[dict[str, Tensor]]] | None = None
    stem: Tensor | None = None
    stem_params: Sequence[nn.Parameter] = ()

    @classmethod
    def local(cls, **fields) -> BalanceContext:
        """A one-process context outside a training step (tests, benchmarks, aggregating given
        Jacobians with ``combine`` or ``weights``): no parameters, plain backward, no
        all-reduce; `fields` set any attribute."""
        defaults = dict(
            shared_params=[],
            task_params={},
            backward=lambda loss: loss.backward(),
            recompute_losses=lambda tasks=None: {},
            all_reduce_mean=lambda tensor: tensor,
        )
        return cls(**{**defaults, **fields})

    def generator(self) -> torch.Generator:
        """A CPU generator seeded by (seed, step): the same draws on every rank."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)


@dataclass
class BalanceResult:
    """What one balancing step chose: the task weights and, when computed, the Gramian of
    the task gradients on the shared parameters (for conflict statistics)."""

    weights: dict[str, float]
    gramian: Tensor | None = None


class Balancer(nn.Module):
    """Base class of every balancing method."""

    #: True for methods that need the per-task gradients (a Jacobian), False for loss weighting.
    needs_task_gradients: bool = False

    @property
    def uses_representation(self) -> bool:
        """Whether the balancer differentiates the losses with respect to the shared features
        (``rep`` mode): the heads must then decode from detached copies of them."""
        return False

    @property
    def uses_stem(self) -> bool:
        """Whether the balancer wants ``BalanceContext.stem`` (the streamed Gramian stops its
        batched backward there)."""
        return False

    def write_own_gradients(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        """Set ``.grad`` of the balancer's own learnable parameters, for wrappers that do not
        run the balancer's `backward`; methods without parameters skip it."""

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        """Update any loss history once per step (before `combine`); stateless methods skip it."""

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        """Write the update's gradients into ``.grad``."""
        raise NotImplementedError

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        """Aggregate the rows of a T x P Jacobian into one update; return (update, weights).

        Has no side effects: several Jacobians of one step can be aggregated alike.
        """
        raise NotImplementedError
