"""The balancer interface.

A balancer receives the per-task losses (already multiplied by their static weights) and writes
the gradients of one update into ``.grad``: the shared parameters get the balanced update, each
task-specific parameter the gradient of its own task's loss. The training step only calls
``balancer.backward(losses, context)`` and then steps the optimiser, so loss weighting, gradient
surgery and sharpness-aware wrappers all plug in without touching the training step.

Balancers are ``nn.Module``s so that learnable weights (e.g. uncertainty weighting) are
optimised with the model and any state lands in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class BalanceContext:
    """What a balancer may use besides the losses, for one training step.

    Attributes:
        shared_params: parameters all tasks share (the backbone).
        task_params: per task, the parameters only that task uses (its head).
        backward: the framework's backward (Lightning's ``manual_backward``), which also
            synchronises gradients across processes under DDP; use it for every backward that
            should write ``.grad``.
        recompute_losses: re-runs the forward pass on the same batch and returns fresh
            per-task losses (sharpness-aware methods evaluate perturbed weights with it).
        all_reduce_mean: averages a tensor over processes (identity on one process).
        step: the global optimiser step.
        seed: the run's seed (with ``step``, seeds any randomness identically on every rank).
    """

    shared_params: Sequence[nn.Parameter]
    task_params: Mapping[str, Sequence[nn.Parameter]]
    backward: Callable[[Tensor], None]
    recompute_losses: Callable[[], dict[str, Tensor]]
    all_reduce_mean: Callable[[Tensor], Tensor]
    step: int
    seed: int


class Balancer(nn.Module):
    """Base class of every balancing method."""

    #: True for methods that need the per-task gradients (a Jacobian), False for loss weighting.
    needs_task_gradients: bool = False

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> dict[str, float]:
        """Write the update's gradients into ``.grad``; return the task weights used (for logs)."""
        raise NotImplementedError
