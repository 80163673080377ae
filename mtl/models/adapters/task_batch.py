"""The task batch: one forward pass that computes differently per task.

At the first task-aware block the token tensor of batch B is repeated to T*B along the batch
axis, task-major (rows ``t*B .. (t+1)*B - 1`` belong to the t-th requested task). Blocks before
it run once. Every task-aware layer reads the requested tasks from the shared `TaskBatch` and
indexes its per-task parameters with them, so a task that is not requested is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

#: A transformer block in timm's ViT (``blocks.3``) and Swin (``layers_1.blocks.0``) naming.
BLOCK = re.compile(r"(^|\.)blocks\.\d+$")


class TaskBatch:
    """Which tasks the current forward pass computes; shared by one backbone's task-aware layers.

    Set only inside `run` (one forward pass), so the object holds no state between calls.

    Args:
        tasks: every task of the model, in order; a layer's per-task parameters follow it.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.active: list[str] = []
        self.batch_size = 0

    @contextmanager
    def run(self, tasks: Sequence[str], batch_size: int) -> Iterator[TaskBatch]:
        """Compute `tasks` for a batch of `batch_size` images during the block."""
        unknown = set(tasks) - set(self.tasks)
        if unknown or not tasks:
            raise KeyError(f"task batch: unknown or no tasks {sorted(unknown)}; have {self.tasks}")
        self.active, self.batch_size = list(tasks), batch_size
        try:
            yield self
        finally:
            self.active, self.batch_size = [], 0

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks of the running forward pass."""
        if not self.active:
            raise RuntimeError("a task-aware layer ran outside TaskBatch.run (no tasks set)")
        return len(self.active)

    def task_ids(self, device: torch.device | None = None) -> Tensor:
        """The task id (index into `tasks`) of every row of the T*B batch."""
        ids = torch.tensor([self.tasks.index(t) for t in self.active], device=device)
        return ids.repeat_interleave(self.batch_size)

    def expand(self, x: Tensor) -> Tensor:
        """Repeat a B-row tensor to the T*B task batch (rows already T*B pass through)."""
        if x.shape[0] == self.batch_size * self.num_tasks:
            return x
        if x.shape[0] != self.batch_size:
            raise ValueError(f"task batch: {x.shape[0]} rows, expected B={self.batch_size}")
        return x.repeat(self.num_tasks, *([1] * (x.dim() - 1)))

    def by_task(self, x: Tensor) -> Tensor:
        """View a task-major T*B... tensor as (T, rows of one task, last dim)."""
        return x.reshape(self.num_tasks, -1, x.shape[-1])

    def attach(self, block: nn.Module) -> None:
        """Make `block` the first task-aware block: its input is repeated to the task batch."""
        block.register_forward_pre_hook(RepeatInput(self))


class RepeatInput:
    """Forward pre-hook that repeats a block's input to the task batch (an object rather than a
    closure, so that `copy.deepcopy` of the model rebinds it to the copied `TaskBatch`)."""

    def __init__(self, task_batch: TaskBatch) -> None:
        self.task_batch = task_batch

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.task_batch.expand(args[0]), *args[1:])


def block_names(model: nn.Module) -> list[str]:
    """Names of the transformer blocks of a timm ViT or Swin, in forward order."""
    return [name for name, _ in model.named_modules() if BLOCK.search(name)]


def block_of(name: str) -> str | None:
    """The block that contains the module `name` (None: outside every block)."""
    match = re.match(r"(.*?(?:^|\.)blocks\.\d+)(\.|$)", name)
    return match.group(1) if match else None


def first_task_block(model: nn.Module, layer_names: Sequence[str]) -> nn.Module:
    """The first block (forward order) that holds one of the task-aware `layer_names`."""
    holders = {block_of(n) for n in layer_names}
    for name in block_names(model):
        if name in holders:
            return model.get_submodule(name)
    raise ValueError(f"task-aware layers {list(layer_names)[:3]}... are not inside any block")
