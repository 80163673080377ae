"""One training step of a slimmable model: the sandwich rule and configuration-invariant
distillation.

Per step the full model runs as usual; `SandwichStep` adds the smallest and k random width
configurations. Each task's loss becomes the sum of its losses over these configurations (the
balancer sees these sums, and gets the same configurations when it re-evaluates the losses), and
the distillation loss pulls each sub-network's backbone features toward the full model's
(detached), as a squared error relative to the full model's feature energy so that it does not
grow with the scale of the features (a ViT's residual stream grows during training)::

    weight * sum_configs mean_levels mean((f_config - sg(f_full))^2) / mean(sg(f_full)^2)

a term outside the balancer, like a regulariser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.slim.apply import Slimming
from mtl.slim.widths import at_widths, roles

#: ``(predictions, batch, tasks) -> weighted loss per task``
LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Any], Sequence[str]], dict[str, Tensor]]


class SandwichStep:
    """The sub-networks of one step (the same on every process for the same `seed`)."""

    def __init__(self, slimming: Slimming, model: nn.Module, seed: int) -> None:
        self.slimming = slimming
        self.configs = slimming.sandwich(roles(model), seed)
        #: the distillation loss of the step's first full evaluation (None before it)
        self.distill: Tensor | None = None

    def add_subnetworks(
        self,
        model: nn.Module,
        losses: Mapping[str, Tensor],
        full_features: Sequence[Tensor],
        batch: Mapping[str, Any],
        tasks: Sequence[str],
        loss_fn: LossFn,
    ) -> dict[str, Tensor]:
        """`losses` (the full model's) plus each configuration's, per task; the first call of a
        step also keeps the distillation loss."""
        total = dict(losses)
        teacher = [f.detach() for f in full_features]
        distill = torch.zeros((), device=teacher[0].device)
        for config in self.configs:
            with at_widths(model, config):
                out = model.decode(batch["image"], tasks)
            for task, loss in loss_fn(out.preds, batch, tasks).items():
                total[task] = total[task] + loss
            levels = [
                F.mse_loss(f, t) / t.square().mean().clamp_min(1e-12)
                for f, t in zip(out.features, teacher, strict=True)
            ]
            distill = distill + torch.stack(levels).mean()
        if self.distill is None:
            self.distill = self.slimming.distill_weight * distill
        return total

    def distill_gradients(self, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
        """The distillation loss's gradient per parameter (None: it does not reach it),
        computed before the balancer, which may free the graph."""
        if self.distill is None or not self.distill.requires_grad:
            return [None] * len(params)
        return list(
            torch.autograd.grad(self.distill, params, retain_graph=True, allow_unused=True)
        )
