"""Task heads. Each decoder maps the backbone's multi-scale NCHW features to one task's output.

A decoder is built from the backbone's `out_channels` and `out_strides`; configs give it as a
Hydra partial so the model can build one per task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "group", "none")


def normalisation(kind: str, channels: int) -> nn.Module:
    """BatchNorm, GroupNorm (32 groups or fewer; independent of the batch, so exact under
    data parallelism without synchronisation) or nothing."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.decoder.norm: {kind!r}; expected one of {NORMS}")


def conv_bn_act(
    in_channels: int, out_channels: int, kernel_size: int, norm: str = "batch"
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"
        ),
        normalisation(norm, out_channels),
        nn.ReLU(inplace=True),
    )


def upsample_and_concat(features: Sequence[Tensor]) -> Tensor:
    """Bilinearly upsample every map to the finest one and concatenate along channels."""
    size = features[0].shape[-2:]
    resized = [features[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]
    ]
    return torch.cat(resized, dim=1)


class ConvDecoder(nn.Module):
    """Fused multi-scale map -> 3x3 conv-BN-ReLU -> 1x1 conv to the task's channels."""

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int,
        hidden_channels: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.order = sorted(range(len(in_strides)), key=lambda i: in_strides[i])
        self.block = conv_bn_act(sum(in_channels), hidden_channels, 3, norm)
        self.classifier = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        fused = upsample_and_concat([features[i] for i in self.order])
        return self.classifier(self.block(fused))


class HRNetDecoder(nn.Module):
    """HRNet-style head: project each scale (1x1), upsample to the finest, concat,
    1x1 conv-BN-ReLU, 1x1 conv to the task's channels."""

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int,
        hidden_channels: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.order = sorted(range(len(in_strides)), key=lambda i: in_strides[i])
        self.projections = nn.ModuleList(
            conv_bn_act(in_channels[i], hidden_channels, 1, norm) for i in self.order
        )
        self.fuse = conv_bn_act(hidden_channels * len(in_channels), hidden_channels, 1, norm)
        self.classifier = nn.Conv2d(hidden_channels, out_channels, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        projected = [
            proj(features[i]) for proj, i in zip(self.projections, self.order, strict=True)
        ]
        return self.classifier(self.fuse(upsample_and_concat(projected)))
