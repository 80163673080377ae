"""The multi-task model: one shared backbone, one decoder per task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.backbone import Backbone

DecoderFactory = Callable[..., nn.Module]


class MultiTaskModel(nn.Module):
    """Shared backbone + per-task decoders; predictions are resized to the input size.

    Args:
        backbone: the shared feature extractor.
        decoder: builds one head, called as ``decoder(in_channels=, in_strides=, out_channels=)``.
        task_channels: output channels per task, in task order.
    """

    def __init__(
        self, backbone: Backbone, decoder: DecoderFactory, task_channels: Mapping[str, int]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = list(task_channels)
        self.decoders = nn.ModuleDict(
            {
                task: decoder(
                    in_channels=backbone.out_channels,
                    in_strides=backbone.out_strides,
                    out_channels=channels,
                )
                for task, channels in task_channels.items()
            }
        )

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every task's loss depends on (the balancers act on these)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that only one task's loss depends on."""
        return {
            task: [p for p in head.parameters() if p.requires_grad]
            for task, head in self.decoders.items()
        }

    #: Whether the backbone computes differently per task (task-conditioned adapters); the
    #: shared features then differ per task and `rep`-mode balancing does not apply.
    task_aware_backbone: bool = False

    def forward(
        self, images: Tensor, tasks: Sequence[str] | None = None, return_features: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Tensor]]:
        """Predictions for `tasks` (default: all), each at the input's spatial size; with
        `return_features`, also the shared backbone features they were decoded from."""
        tasks = self.tasks if tasks is None else list(tasks)
        unknown = set(tasks) - set(self.decoders)
        if unknown:
            raise KeyError(f"model has no head for {sorted(unknown)}; heads: {self.tasks}")
        features = self.backbone(images)
        size = images.shape[-2:]
        preds = {
            task: F.interpolate(
                self.decoders[task](features), size=size, mode="bilinear", align_corners=False
            )
            for task in tasks
        }
        return (preds, features) if return_features else preds
