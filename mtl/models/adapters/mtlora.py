"""`mtlora` (MTLoRA, CVPR 2024): shared LoRA everywhere plus per-task LoRA in chosen blocks.

Difference to the reference: there the shared stream stays task-agnostic and the task-specific
outputs only feed the decoders; here, as everywhere in this framework, the stream becomes the
task batch at the first task-aware block and stays per task (one backbone pass per task after
it), which is simpler and lets later blocks specialise too.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtl.models.adapters.lora import DEFAULT_TARGETS, TaskLoRALinear, replace_module
from mtl.models.adapters.shared_lora import LoRA
from mtl.models.adapters.task_batch import TaskBatch, block_names, block_of, first_task_block


class MTLoRA(LoRA):
    """Shared LoRA (`rank`, `alpha`) on `targets` of every block; per-task LoRA (`task_rank`,
    `task_alpha`) on `task_targets` of `task_blocks`.

    Args:
        task_blocks: block names (``blocks.3``, ``layers_1.blocks.1``) or ViT block indices;
            None: the last block feeding each feature level (Swin: the last block of each
            stage; ViT: the blocks of ``out_indices``).
        Others: as `LoRA`.
    """

    task_aware = True

    def __init__(
        self,
        rank: int = 64,
        alpha: float = 256.0,
        dropout: float = 0.05,
        targets: Sequence[str] = DEFAULT_TARGETS,
        task_rank: int = 4,
        task_alpha: float = 16.0,
        task_targets: Sequence[str] = (r"attn\.proj", r"mlp\.fc1", r"mlp\.fc2"),
        task_blocks: Sequence[str | int] | None = None,
        trainable: Sequence[str] = (),
        task_aware: bool = True,
    ) -> None:
        super().__init__(rank, alpha, dropout, targets, trainable, task_aware)
        self.task_rank, self.task_alpha = task_rank, task_alpha
        self.task_targets = list(task_targets)
        self.task_blocks = None if task_blocks is None else list(task_blocks)

    def _blocks(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        """Full names of the blocks that get task-specific LoRA."""
        names = block_names(model)
        if self.task_blocks is None:
            return list(taps)
        chosen = []
        for block in self.task_blocks:
            if isinstance(block, int):
                chosen += names[block : block + 1] if -len(names) <= block < len(names) else []
            else:
                chosen += [n for n in names if n == block or n.endswith("." + block)]
        return chosen

    def _task_layers(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        blocks = set(self._blocks(model, taps))
        candidates = LoRA(targets=self.task_targets).inject_names(model)
        return [n for n in candidates if block_of(n) in blocks]

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        problems = super().problems(model, taps)
        if self.task_rank <= 0:
            problems.append(f"model.adapter.task_rank: {self.task_rank}; expected > 0")
        if not block_names(model):
            return problems  # super() already reports that nothing matches
        if self.task_blocks is not None and len(self._blocks(model, taps)) < len(self.task_blocks):
            problems.append(
                f"model.adapter.task_blocks: {self.task_blocks} names blocks this backbone lacks;"
                f" expected names among {block_names(model)[:3]}... or block indices"
            )
        elif not self._task_layers(model, taps):
            problems.append(
                f"model.adapter.task_targets: {self.task_targets} match no linear layer of the "
                f"task blocks {self._blocks(model, taps)}"
            )
        return problems

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> TaskBatch:
        self._check(model, taps)
        task_layers = self._task_layers(model, taps)
        super().apply(model, taps, tasks)  # shared LoRA everywhere, base frozen
        task_batch = TaskBatch(tasks)
        for name in task_layers:
            shared = model.get_submodule(name)
            layer = TaskLoRALinear(
                shared, tasks, task_batch, self.task_rank, self.task_alpha, self.dropout
            )
            replace_module(model, name, layer)
        task_batch.attach(first_task_block(model, task_layers))
        return task_batch
