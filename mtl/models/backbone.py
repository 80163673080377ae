"""A timm model as a multi-scale feature extractor that always returns NCHW maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.models._features import FeatureGetterNet, FeatureListNet
from torch import Tensor, nn

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.task_batch import TaskBatch, block_names
from mtl.models.pretrained import FILE_KEY, HUB_KEY, checked_state, weights_file


class Backbone(nn.Module):
    """Wraps any timm model that timm can build with `features_only=True`.

    Convolutional nets give their stages, ViTs their blocks (through `forward_intermediates`),
    Swin its stages. Some of them return NHWC maps (timm's `output_fmt`); this wrapper permutes
    those, so callers always receive a list of NCHW tensors, described by `out_channels` and
    `out_strides`.

    After `adapt` with a task-aware adapter, `forward(images, tasks)` runs the task batch: the
    maps have T*B rows, task-major (rows t*B..(t+1)*B-1 are the t-th task's).

    Args:
        name: timm model name, e.g. ``resnet18`` or ``vit_small_patch16_224``.
        pretrained_file: optional local weights file (machines may be offline).
        pretrained: without a file, timm's hub weights of `name` (``arch.tag``) from the local
            Hugging Face cache, read offline; neither: random initialisation.
        pretrained_strict: False loads weights that fit in part (with a warning) instead of
            raising `WeightsError` (see `mtl.models.pretrained.checked_state`).
        out_indices: which feature levels to return (timm's indexing); None: timm's default.
            ViT levels are the chosen blocks' outputs, before any norm.
        norm_last: pass the last level through the model's final norm (ViT, Swin: models timm
            reads through ``forward_intermediates``), as MLoRE and TaskExpert tap a ViT.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``patch_size``).
    """

    def __init__(
        self,
        name: str,
        pretrained_file: str | None = None,
        pretrained: bool = False,
        pretrained_strict: bool = True,
        out_indices: Sequence[int] | None = None,
        norm_last: bool = False,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"model.backbone.name: '{name}' is not a timm model")
        kwargs = dict(timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        path = weights_file(name, pretrained_file, pretrained)
        if path is not None:
            key = FILE_KEY if pretrained_file else HUB_KEY
            features = {k: v for k, v in kwargs.items() if k not in timm_kwargs}
            state = checked_state(name, path, pretrained_strict, key, features, **timm_kwargs)
            kwargs["pretrained_cfg_overlay"] = dict(state_dict=state)
        self.name = name
        if norm_last:
            self.model = _getter_keeping_norm(name, path is not None, kwargs)
        else:
            self.model = timm.create_model(
                name, pretrained=path is not None, features_only=True, **kwargs
            )
        #: The final norm applied to the last level (`norm_last`), else None.
        self.last_norm: nn.Module | None = self.model.model.norm if norm_last else None
        for module in self.model.modules():  # timm keeps the overlay (a copy of the weights)
            cfg = getattr(module, "pretrained_cfg", None)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.out_strides: list[int] = list(self.model.feature_info.reduction())
        self.channels_last_output = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        #: Shared by the task-aware layers an adapter inserted; None: the plain backbone.
        self.task_batch: TaskBatch | None = None

    @property
    def taps(self) -> list[str]:
        """Per feature level, the name of the last transformer block feeding it (ViT: the
        ``out_indices`` blocks, Swin: each stage's last block); empty for CNNs."""
        blocks = block_names(self.model)
        taps = []
        for module in self.model.feature_info.module_name():
            stage = {module, module.replace(".", "_")}
            feeding = [
                b
                for b in blocks
                if b.split(".", 1)[-1] == module
                or b == module
                or b.rsplit(".blocks.", 1)[0] in stage
            ]
            taps += feeding[-1:]
        return taps

    def _stem_children(self) -> list[nn.Module]:
        """The children a CNN runs ahead of its first feature stage (ResNet's conv1 ..
        maxpool, ConvNeXt's stem); empty for transformers and task-aware or compiled
        backbones, whose intermediate tensors are not separate autograd nodes."""
        compiled = getattr(self, "_compiled_call_impl", None) is not None
        if self.task_batch is not None or compiled or not isinstance(self.model, FeatureListNet):
            return []
        children = dict(self.model.named_children())
        first = self.model.feature_info.module_name()[0].replace(".", "_")
        names = list(children)
        return [children[n] for n in names[: names.index(first)]] if first in names else []

    def stem(self) -> nn.Module | None:
        """The module whose output the first feature stage reads (see `_stem_children`)."""
        children = self._stem_children()
        return children[-1] if children else None

    def stem_parameters(self) -> list[nn.Parameter]:
        """The parameters that act before `stem`'s output."""
        return [p for child in self._stem_children() for p in child.parameters()]

    def adapt(self, adapter: Adapter, tasks: Sequence[str]) -> None:
        """Apply `adapter` to the timm model in place (before moving or copying the module)."""
        self.task_batch = adapter.apply(self.model, self.taps, list(tasks))

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> list[Tensor]:
        """NCHW maps; `tasks` (default: all) matter only for a task-aware backbone."""
        if self.task_batch is None:
            features = self.model(images)
        else:
            batch = self.task_batch
            with batch.run(batch.tasks if tasks is None else tasks, images.shape[0]):
                features = [batch.expand(f) for f in self._token_batch_features(images)]
        if self.channels_last_output:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        features = list(features)
        if self.last_norm is not None:  # a per-token norm over channels
            last = self.last_norm(features[-1].permute(0, 2, 3, 1))
            features[-1] = last.permute(0, 3, 1, 2).contiguous()
        return features

    def _token_batch_features(self, images: Tensor) -> list[Tensor]:
        """Features whose batch size may grow inside the network (timm's ViT reshape assumes
        it does not, so ask for tokens and reshape here)."""
        if not isinstance(self.model, FeatureGetterNet) or self.channels_last_output:
            return list(self.model(images))
        vit = self.model.model
        tokens = vit.forward_intermediates(
            images,
            indices=self.model.out_indices,
            norm=self.model.norm,  # False (never pruned with `norm_last`: applied in forward)
            output_fmt="NLC",
            intermediates_only=True,
        )
        h, w = vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        return [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in tokens]


def _getter_keeping_norm(name: str, pretrained: bool, kwargs: dict) -> FeatureGetterNet:
    """timm's intermediate-feature extractor of `name` that keeps the final norm (timm prunes
    it unless every level is normed) while returning un-normed levels.

    ``create_model(features_only=True)`` offers no such option, so wrap the built model here."""
    kwargs = dict(kwargs)
    out_indices = kwargs.pop("out_indices", None)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not hasattr(model, "forward_intermediates") or not isinstance(
        getattr(model, "norm", None), nn.Module
    ):
        raise ValueError(
            f"model.backbone.norm_last: '{name}' has no final norm over its intermediate "
            "features (a ViT or Swin has); set model.backbone.norm_last=false"
        )
    indices = 3 if out_indices is None else out_indices  # timm's ViT default
    getter = FeatureGetterNet(model, out_indices=indices, norm=True)
    getter.norm = False
    return getter


def meta_backbone(options: Mapping[str, Any]) -> Backbone | None:
    """The backbone of a ``model.backbone`` config built on the meta device (no memory, no
    weights read), for checks before training; None when it cannot be built (an unknown
    backbone or option, which the backbone checks report)."""
    kwargs = {k: v for k, v in options.items() if not k.startswith("_")}
    kwargs.update(pretrained_file=None, pretrained=False)
    try:
        with torch.device("meta"):
            return Backbone(**kwargs)
    except Exception:
        return None
