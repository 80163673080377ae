"""What the model asks of its decoder: every requested task's prediction from the backbone features.

Two kinds of decoder configs exist:

- a *per-task head* (`ConvDecoder`, `HRNetDecoder`, ...): any module built as
  ``head(in_channels=, in_strides=, out_channels=)`` that maps the feature list to one task's
  output; the model builds one per task (`PerTaskDecoders`), and no parameter is shared.
- a *multi-task decoder* (a `MultiTaskDecoder` subclass: MLoRE, TaskExpert): built once as
  ``decoder(in_channels=, in_strides=, task_channels=)``; it may share parameters between tasks
  (e.g. a fusion conv every task reads) and may add auxiliary losses (e.g. load balancing).

`build_decoder` tells them apart by the configured class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

#: Features per task: the same list for every task with a shared backbone, each task's own
#: rows with a task-aware one.
TaskInputs = Mapping[str, Sequence[Tensor]]


class MultiTaskDecoder(nn.Module):
    """Base of decoders that see all requested tasks at once.

    Subclasses implement `forward` and `task_parameters`; parameters no task owns alone are the
    decoder's shared parameters, which the balancers treat like the backbone's.
    """

    #: Whether some parameters serve several tasks. Gradient balancing at the backbone features
    #: (``balancer.mode=rep``) would leave such parameters untrained, so configs refuse it.
    shares_parameters: bool = True

    @property
    def tasks(self) -> list[str]:
        raise NotImplementedError

    def forward(self, inputs: TaskInputs) -> dict[str, Tensor]:
        """Each task's prediction (at the decoder's own resolution) for the tasks in `inputs`;
        only the parts those tasks need run."""
        raise NotImplementedError

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Trainable parameters only `task`'s loss depends on."""
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters several tasks' losses depend on."""
        own = {id(p) for task in self.tasks for p in self.task_parameters(task)}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted auxiliary losses of the last forward, per task (e.g. expert load
        balancing); a term that couples tasks is split equally among the tasks it covers.
        Empty by default."""
        return {}


class PerTaskDecoders(nn.ModuleDict, MultiTaskDecoder):
    """One independent head per task (keys: task names; a `ModuleDict`, so the checkpoint keys
    stay ``decoders.<task>.*``)."""

    shares_parameters = False

    @property
    def tasks(self) -> list[str]:
        return list(self.keys())

    def forward(self, inputs: TaskInputs) -> dict[str, Tensor]:
        return {task: self[task](features) for task, features in inputs.items()}

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for p in self[task].parameters() if p.requires_grad]


def is_multitask(factory: Callable[..., nn.Module]) -> bool:
    """Whether a decoder factory (a class or a partial of one) builds a `MultiTaskDecoder`."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    return isinstance(target, type) and issubclass(target, MultiTaskDecoder)


def build_decoder(
    factory: Callable[..., nn.Module],
    in_channels: Sequence[int],
    in_strides: Sequence[int],
    task_channels: Mapping[str, int],
) -> MultiTaskDecoder:
    """The model's decoder for `task_channels` from a configured factory of either kind."""
    if is_multitask(factory):
        return factory(
            in_channels=list(in_channels),
            in_strides=list(in_strides),
            task_channels=dict(task_channels),
        )
    return PerTaskDecoders(
        {
            task: factory(in_channels=in_channels, in_strides=in_strides, out_channels=channels)
            for task, channels in task_channels.items()
        }
    )
