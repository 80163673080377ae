"""Non-finite training steps: find them, name the task, skip the update, stop when they persist.

A step whose loss or gradient holds NaN or inf is skipped whole: the gradients are zeroed and
neither the optimiser nor the learning-rate scheduler steps, so Adam's moments and step count,
the schedule and Lightning's ``global_step`` (which counts optimiser steps) all stay where the
last good step left them and in step with each other. The step's forward passes have updated
buffers already (BatchNorm running statistics, the loss statistics of DWA and FAMO): `Buffers`
saves them before the step and puts them back when it is skipped. A non-finite floating
buffer after the step (a running variance overflowing to inf) makes the step bad too, naming
the buffer. After ``max_bad_steps`` consecutive bad steps the run stops with `NonFiniteError`.

Under DDP every process must take the same decision, or one process would step (and enter the
next collective) while another skips: the local verdict is summed over processes (one scalar
all-reduce for the losses, one for the gradients) and the step is skipped everywhere when any
process saw a non-finite value.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Sums a tensor over processes (identity on one process).
ReduceSum = Callable[[Tensor], Tensor]
#: Names a non-finite value that another process saw.
ELSEWHERE = "another process"


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients for too many consecutive steps."""


def nonfinite_losses(losses: Mapping[str, Tensor]) -> list[str]:
    """Tasks whose loss is NaN or infinite."""
    if not losses:
        return []
    values = torch.stack([loss.detach().float().reshape(()) for loss in losses.values()])
    finite = torch.isfinite(values).tolist()
    return [task for task, ok in zip(losses, finite, strict=True) if not ok]


def _finite(params: Iterable[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # fused; a NaN or inf entry makes its norm non-finite
    return bool(torch.isfinite(torch.stack(norms)).all())


def nonfinite_gradients(
    params: Sequence[nn.Parameter],
    task_params: Mapping[str, Sequence[nn.Parameter]],
    gramian: Tensor | None = None,
) -> list[str]:
    """Where the gradients of ``params`` are not finite: the tasks whose own parameters (head,
    per-task adapter) have a non-finite gradient, or whose shared gradient is non-finite (the
    Gramian's diagonal, when the balancer formed one); ``["gradient"]`` when no task can be
    singled out; ``[]`` when every gradient is finite."""
    if _finite(params):
        return []
    tasks = [task for task, own in task_params.items() if not _finite(own)]
    if gramian is not None:
        diagonal = torch.isfinite(torch.diagonal(gramian)).tolist()
        tasks += [t for t, ok in zip(task_params, diagonal, strict=False) if not ok]
    return list(dict.fromkeys(tasks)) or ["gradient"]


class Buffers:
    """The persistent buffers (and extra state) of some modules: saved before a step, restored
    when it is skipped; the floating buffers checked for non-finite values.

    Non-persistent buffers (attention masks, index tables) are constants outside the state
    dict and are left alone. The copies are allocated once and refreshed with one fused copy
    per step (`torch._foreach_copy_`; no public equivalent). The buffers' places are found once
    per fit (`find`), the tensors looked up each time: moving a module to a device replaces
    its buffers.

    Args:
        modules: the modules, by the prefix their buffers are named with.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.slots: list[tuple[str, nn.Module, str]] | None = None
        self.saved: list[Tensor] = []
        # modules with extra state (FAMO's optimiser of its task logits): saved as deep copies
        self.extra = [
            module
            for root in self.modules.values()
            for module in root.modules()
            if type(module).get_extra_state is not nn.Module.get_extra_state
        ]
        self.saved_extra: list[Any] = []

    def find(self) -> None:
        """Find the buffers anew (after modules were replaced, e.g. by SyncBatchNorm)."""
        self.slots = [
            (f"{prefix}.{name}" if name else prefix, owner, key)
            for prefix, module in self.modules.items()
            for name, owner in module.named_modules()
            for key, value in owner._buffers.items()
            if value is not None and key not in owner._non_persistent_buffers_set
        ]
        self.saved = []

    def tensors(self) -> list[Tensor]:
        if self.slots is None:
            self.find()
        return [owner._buffers[key] for _, owner, key in self.slots]

    def save(self) -> None:
        self.saved_extra = [copy.deepcopy(module.get_extra_state()) for module in self.extra]
        current = self.tensors()
        if not current:
            return
        same = len(self.saved) == len(current) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(self.saved, current, strict=True)
        )
        if same:
            torch._foreach_copy_(self.saved, current)
        else:
            self.saved = [tensor.detach().clone() for tensor in current]

    def restore(self) -> None:
        for module, state in zip(self.extra, self.saved_extra, strict=False):
            module.set_extra_state(copy.deepcopy(state))
        if self.saved:
            with torch.no_grad():
                torch._foreach_copy_(self.tensors(), self.saved)

    def nonfinite(self) -> list[str]:
        """Names of the floating buffers holding NaN or inf."""
        tensors = self.tensors()
        named = [
            (f"{name}.{key}", tensor)
            for (name, _, key), tensor in zip(self.slots or [], tensors, strict=True)
            if tensor.is_floating_point() and tensor.numel()
        ]
        if not named:
            return []
        # largest magnitude per buffer, fused; inf-norm cannot overflow on finite values
        peaks = torch._foreach_norm([tensor for _, tensor in named], ord=math.inf)
        finite = torch.isfinite(torch.stack(peaks)).tolist()
        return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def agree(local: list[str], reduce_sum: ReduceSum, device: torch.device) -> list[str]:
    """The same verdict on every process: ``local`` when this process saw a bad value,
    ``[ELSEWHERE]`` when only another did, ``[]`` when none did."""
    count = reduce_sum(torch.tensor(float(bool(local)), device=device))
    if float(count) == 0:
        return []
    return local or [ELSEWHERE]


class StepGuard:
    """Counts consecutive non-finite steps; logs each one and raises when they persist.

    Args:
        max_bad_steps: consecutive bad steps after which `NonFiniteError` stops the run.
    """

    def __init__(self, max_bad_steps: int = 3) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: {max_bad_steps}; expected >= 1")
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.skipped = 0

    def good(self) -> None:
        """A step was taken: the consecutive count starts again."""
        self.consecutive = 0

    def bad(self, what: str, where: Sequence[str], step: int, epoch: int) -> None:
        """Record a skipped step: ``what`` is "loss", "gradient" or "buffer", ``where`` the
        tasks or buffers."""
        self.consecutive += 1
        self.skipped += 1
        named = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        message = (
            f"non-finite {what} at step {step} (epoch {epoch}) in {named}; "
            f"optimiser step skipped ({self.consecutive} consecutive, "
            f"stopping at max_bad_steps={self.max_bad_steps})"
        )
        log.warning(message)
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"{self.consecutive} consecutive training steps had non-finite values; last: "
                f"{message}. Lower optim.optimizer.lr, set optim.grad_clip_norm, check the data "
                "(python -m mtl.data.verify) or locate the operation with debug=anomaly."
            )
