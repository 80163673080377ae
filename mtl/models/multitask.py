"""The multi-task model: one shared backbone, a decoder for every task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.adapters import Adapter
from mtl.models.backbone import Backbone
from mtl.models.decoders.base import build_decoder

DecoderFactory = Callable[..., nn.Module]


class MultiTaskModel(nn.Module):
    """Shared backbone + decoder; predictions are resized to the input size.

    Args:
        backbone: the shared feature extractor.
        decoder: a per-task head factory, called as ``decoder(in_channels=, in_strides=,
            out_channels=)`` once per task, or a `MultiTaskDecoder` class (partial) built once
            for all tasks (``mtl.models.decoders.base``).
        task_channels: output channels per task, in task order.
        adapter: modifies the backbone (LoRA, MTLoRA, MoE); None: the backbone as built.
        aux_heads: per training-only task, a factory of its auxiliary head, called as
            ``head(in_channels=, in_strides=)`` (its output channels already bound) and run
            on the shared features only when the task is requested (training). The
            inference model is built without them (``mtl.load``).
    """

    def __init__(
        self,
        backbone: Backbone,
        decoder: DecoderFactory,
        task_channels: Mapping[str, int],
        adapter: Adapter | None = None,
        aux_heads: Mapping[str, DecoderFactory] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = list(task_channels)
        self.aux_tasks = list(aux_heads or {})
        if adapter is not None:
            backbone.adapt(adapter, self.tasks)
        self.task_aware_backbone = backbone.task_batch is not None
        self.decoders = build_decoder(
            decoder, backbone.out_channels, backbone.out_strides, task_channels
        )
        if self.aux_tasks and self.task_aware_backbone:
            raise ValueError(
                f"auxiliary heads ({self.aux_tasks}) read one shared representation, but the "
                "adapter is task-aware (per-task features)"
            )
        self.aux_heads = nn.ModuleDict(
            {
                task: head(in_channels=backbone.out_channels, in_strides=backbone.out_strides)
                for task, head in (aux_heads or {}).items()
            }
        )

    def _backbone_task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Backbone parameters of each task's own adapter layers (per-task LoRA, routers)."""
        own: dict[str, list[nn.Parameter]] = {t: [] for t in self.tasks}
        for module in self.backbone.modules():
            if hasattr(module, "task_parameters"):
                for task in self.tasks:
                    own[task] += [p for p in module.task_parameters(task) if p.requires_grad]
        return own

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters several tasks' losses depend on (the balancers act on these): the
        backbone's, and a multi-task decoder's shared ones."""
        own = {id(p) for params in self._backbone_task_parameters().values() for p in params}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad and id(p) not in own]
        return backbone + self.decoders.shared_parameters()

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that only one task's loss depends on: its head and its adapter layers
        (a training-only task: its auxiliary head)."""
        own = self._backbone_task_parameters()
        params = {task: own[task] + self.decoders.task_parameters(task) for task in self.tasks}
        for task, head in self.aux_heads.items():
            params[task] = [p for p in head.parameters() if p.requires_grad]
        return params

    #: Whether the backbone computes differently per task (task-conditioned adapters); the
    #: shared features then differ per task and `rep`-mode balancing does not apply. Set per
    #: instance from the adapter.
    task_aware_backbone: bool = False

    def _moe_layers(self) -> list[nn.Module]:
        """Backbone modules with a routing loss (``balance_loss``, ``balance_weight``) and
        ``load`` (MoE MLPs, Mod-Squad gates)."""
        return [m for m in self.backbone.modules() if hasattr(m, "balance_loss")]

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Weighted auxiliary losses of the last forward, per task (MoE load balancing in the
        backbone or the decoder, summed over layers); add each to its task's loss. Empty
        without such layers."""
        losses: dict[str, Tensor] = {}

        def add(task: str, loss: Tensor) -> None:
            losses[task] = losses[task] + loss if task in losses else loss

        for layer in self._moe_layers():
            for task, loss in layer.balance_loss.items():
                add(task, layer.balance_weight * loss)
        for task, loss in self.decoders.auxiliary_losses().items():
            add(task, loss)
        return losses

    def routing_statistics(self, per_expert: bool = True) -> dict[str, float]:
        """Routing of the last forward, per MoE layer and task: the fraction of routed tokens
        of each expert (``moe/<layer>/<task>/expert<e>``) and its cv² (``.../load_cv2``)."""
        stats: dict[str, float] = {}
        for i, layer in enumerate(self._moe_layers()):
            if layer.load is None:
                continue
            for task, load in zip(layer.load_tasks, layer.load, strict=True):
                share = load.float() / load.sum().clamp(min=1)
                prefix = f"moe/layer{i}/{task}"
                stats[f"{prefix}/load_cv2"] = float(share.var() / share.mean().pow(2))
                if per_expert:
                    stats.update({f"{prefix}/expert{e}": float(s) for e, s in enumerate(share)})
        return stats

    def merge_adapters(self) -> None:
        """Fold the shared LoRA updates into the base weights (inference)."""
        for module in self.backbone.modules():
            if hasattr(module, "merge"):
                module.merge()

    def unmerge_adapters(self) -> None:
        """Undo `merge_adapters` (before training on)."""
        for module in self.backbone.modules():
            if hasattr(module, "unmerge"):
                module.unmerge()

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Predictions for `tasks` (default: all), each at the input's spatial size."""
        return self.decode(images, tasks).preds

    def decode(
        self,
        images: Tensor,
        tasks: Sequence[str] | None = None,
        detach_features: bool = False,
        probe_features: bool = False,
        keep_stem: bool = False,
    ) -> Decoded:
        """Predictions for `tasks` (default: all) with the backbone features they came from.

        With `detach_features`, the heads decode from leaf copies of the features
        (``Decoded.head_inputs``), so a task's gradient with respect to them covers its head
        alone. Differentiating with respect to the features themselves would not: a
        multi-scale backbone computes each scale from the previous one, so the gradient of a
        coarse-to-fine list is the total derivative through the later stages. Task-aware
        backbone: the features are the task batch, T*B rows, task-major in `tasks` order.

        With `probe_features` (and without `detach_features`), the heads decode from
        ``feature + probe``, ``probe`` a zero leaf per feature (``Decoded.probes``): the
        gradient with respect to a probe is that of the heads alone, while the backbone
        receives its gradients as without probes. With `detach_features` the leaf copies serve
        as probes.

        With `keep_stem`, ``Decoded.stem`` is the output of a CNN backbone's stem (None where
        it has none): the streamed Gramian stops its batched backward there.
        """
        tasks = self.tasks if tasks is None else list(tasks)
        unknown = set(tasks) - set(self.tasks) - set(self.aux_tasks)
        if unknown:
            heads = self.tasks + self.aux_tasks
            raise KeyError(f"model has no head for {sorted(unknown)}; heads: {heads}")
        aux = [t for t in tasks if t in self.aux_heads]
        tasks = [t for t in tasks if t not in self.aux_heads]
        size = images.shape[-2:]
        stem = self.backbone.stem() if keep_stem and isinstance(self.backbone, Backbone) else None
        kept: list[Tensor] = []
        handle = stem.register_forward_hook(lambda *args: kept.append(args[-1])) if stem else None
        try:
            features = (
                self.backbone(images, tasks) if self.task_aware_backbone else self.backbone(images)
            )
        finally:
            if handle is not None:
                handle.remove()
        probes: list[Tensor] | None = None
        if detach_features:
            head_inputs = [f.detach().requires_grad_() for f in features]
            probes = head_inputs
        elif probe_features:
            probes = [torch.zeros_like(f, requires_grad=True) for f in features]
            head_inputs = [f + probe for f, probe in zip(features, probes, strict=True)]
        else:
            head_inputs = features
        if self.task_aware_backbone:
            per_task = [f.chunk(len(tasks)) for f in head_inputs]
            inputs = {task: [chunks[i] for chunks in per_task] for i, task in enumerate(tasks)}
        else:
            inputs = dict.fromkeys(tasks, head_inputs)
        decoded = self.decoders({task: inputs[task] for task in tasks}) if tasks else {}
        preds = {
            task: F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            for task, pred in decoded.items()
        }
        preds.update({task: self.aux_heads[task](head_inputs, size) for task in aux})
        return Decoded(preds, list(features), list(head_inputs), probes, kept[0] if kept else None)


class Decoded(NamedTuple):
    """One forward pass: the predictions per task, the backbone features and the tensors the
    heads decoded from (the features, or their detached leaf copies)."""

    preds: dict[str, Tensor]
    features: list[Tensor]
    head_inputs: list[Tensor]
    probes: list[Tensor] | None = None  # leaves whose gradient covers the heads alone
    stem: Tensor | None = None  # the backbone stem's output, when kept
