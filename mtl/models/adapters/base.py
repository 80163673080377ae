"""What every adapter is: a recipe that modifies a backbone's timm model in place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import nn

from mtl.models.adapters.task_batch import TaskBatch


class Adapter:
    """Base of the adapter recipes (``conf/model/adapter``); the plain one changes nothing.

    Args:
        task_aware: must equal the class's `task_aware` (the config states it, for the checks
            that run before any model is built).
    """

    #: Whether the adapted backbone computes differently per task (needs the task batch).
    task_aware: ClassVar[bool] = False

    def __init__(self, task_aware: bool = False) -> None:
        if task_aware != type(self).task_aware:
            raise ValueError(
                f"model.adapter.task_aware: {task_aware} but {type(self).__name__} is "
                f"{'' if type(self).task_aware else 'not '}task-aware; set it to "
                f"{type(self).task_aware}"
            )

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        """Why this adapter cannot be applied to the timm `model` (empty: it can).

        Args:
            model: the backbone's timm feature model (may live on the meta device).
            taps: per feature level, the name of the last block feeding it (empty for CNNs).
        """
        return []

    def apply(
        self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]
    ) -> TaskBatch | None:
        """Modify `model` in place; return the task batch its task-aware layers share, if any."""
        return None

    def _check(self, model: nn.Module, taps: Sequence[str]) -> None:
        problems = self.problems(model, taps)
        if problems:
            raise ValueError("; ".join(problems))


NoAdapter = Adapter
