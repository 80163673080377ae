"""Building blocks the decoders share: normalisation by name, conv-norm-activation, scale fusion."""

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
