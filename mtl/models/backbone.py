"""A timm model as a multi-scale feature extractor that always returns NCHW maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
from torch import Tensor, nn


class Backbone(nn.Module):
    """Wraps any timm model that timm can build with `features_only=True`.

    Convolutional nets give their stages, ViTs their blocks (through `forward_intermediates`),
    Swin its stages. Some of them return NHWC maps (timm's `output_fmt`); this wrapper permutes
    those, so callers always receive a list of NCHW tensors, described by `out_channels` and
    `out_strides`.

    Args:
        name: timm model name, e.g. ``resnet18`` or ``vit_small_patch16_224``.
        pretrained_file: optional local weights file (machines may be offline); random init if None.
        out_indices: which feature levels to return (timm's indexing); None: timm's default.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``patch_size``).
    """

    def __init__(
        self,
        name: str,
        pretrained_file: str | None = None,
        out_indices: Sequence[int] | None = None,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"model.backbone.name: '{name}' is not a timm model")
        kwargs = dict(timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if pretrained_file is not None:
            path = Path(pretrained_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"model.backbone.pretrained_file: no file at '{path}'")
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        self.name = name
        self.model = timm.create_model(
            name, pretrained=pretrained_file is not None, features_only=True, **kwargs
        )
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.out_strides: list[int] = list(self.model.feature_info.reduction())
        self.channels_last_output = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.model(images)
        if self.channels_last_output:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return list(features)
