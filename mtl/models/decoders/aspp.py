"""DeepLabV3's atrous spatial pyramid pooling (ASPP) head, one per task.

The head reads the coarsest backbone level only (DeepLabV3 has no skip connections): parallel
branches (a 1x1 conv, three dilated 3x3 convs, image pooling), concatenated, projected by a 1x1
conv, refined by a 3x3 conv and classified by a 1x1 conv, at that level's stride.

Dilation rates are given for a feature map at stride `rates_stride` (default: ``[12, 24, 36]``
at stride 16) and rescaled to the stride of the level the head reads, so that every branch sees
the same field of view in image pixels on any backbone: a ViT/16 reads with 12/24/36, a
ResNet's stride-32 stage with 6/12/18. DeepLabV3 itself uses 6/12/18 at output stride 16 and
12/24/36 at output stride 8; set ``model.decoder.rates`` to change them. A dilation at least as
large as the map makes a 3x3 branch a 1x1 conv (every tap but the centre reads the zero
padding); the image-pooling branch carries the global context then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from mtl.models.decoders.layers import conv_bn_act, normalisation


def scaled_rates(rates: Sequence[int], rates_stride: int, stride: int) -> list[int]:
    """Dilations at `stride` that cover the image area `rates` cover at `rates_stride` (at
    least 1)."""
    return [max(1, round(rate * rates_stride / stride)) for rate in rates]


def _pooled_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation of the image-pooling branch's 1x1 map: group norm with at least two
    channels per group for ``batch`` and ``group``. Batch norm there would normalise over the
    batch alone, one value per image: at batch size 2 every channel becomes +-1, at batch size 1
    training fails; group norm normalises each image's pooled vector by itself."""
    if kind == "none":
        return nn.Identity()
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


class ASPPDecoder(nn.Module):
    """ASPP on the coarsest level -> 1x1 projection -> 3x3 conv block -> 1x1 classifier.

    Args:
        in_channels, in_strides: the backbone levels; the head reads the coarsest one (the
            last of them when several share the largest stride, e.g. a ViT's deepest tap).
        out_channels: the task's channels.
        hidden_channels: channels of every branch and of the projection (DeepLabV3: 256).
        rates: dilations of the 3x3 branches at stride `rates_stride`.
        rates_stride: the stride `rates` are given for.
        norm: ``batch``, ``group`` or ``none`` (the pooling branch: group norm unless ``none``,
            see `_pooled_norm`; so the head trains at any batch size, 1 included).
        dropout: dropout after the projection.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int,
        hidden_channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        rates_stride: int = 16,
        norm: str = "batch",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        problems = self.option_problems(
            dict(rates=rates, rates_stride=rates_stride, dropout=dropout)
        )
        if problems:
            raise ValueError("; ".join(problems))
        coarsest = max(in_strides)
        self.level = max(i for i, s in enumerate(in_strides) if s == coarsest)
        self.rates = scaled_rates(rates, rates_stride, coarsest)
        channels, bias = in_channels[self.level], norm == "none"
        self.branches = nn.ModuleList([conv_bn_act(channels, hidden_channels, 1, norm)])
        for rate in self.rates:
            self.branches.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden_channels, 3, padding=rate, dilation=rate, bias=bias),
                    normalisation(norm, hidden_channels),
                    nn.ReLU(inplace=True),
                )
            )
        self.pooling = nn.Sequential(  # image pooling: global context, constant over the map
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden_channels, 1, bias=bias),
            _pooled_norm(norm, hidden_channels),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Sequential(
            conv_bn_act(hidden_channels * (len(self.branches) + 1), hidden_channels, 1, norm),
            nn.Dropout(dropout),
        )
        self.block = conv_bn_act(hidden_channels, hidden_channels, 3, norm)
        self.classifier = nn.Conv2d(hidden_channels, out_channels, 1)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """The decoder node's problems, found before training (``mtl.config``)."""
        return cls.option_problems(OmegaConf.to_container(cfg.model.decoder, resolve=True))

    @staticmethod
    def option_problems(options: dict[str, Any]) -> list[str]:
        """Problems of the ``model.decoder`` options, one line each naming the key."""
        problems = []
        rates, stride = options.get("rates", (12, 24, 36)), options.get("rates_stride", 16)
        if not isinstance(rates, Sequence) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates
        ):
            problems.append(
                f"model.decoder.rates: {rates!r}; expected a list of integers >= 1, e.g. "
                "[12, 24, 36]"
            )
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            problems.append(f"model.decoder.rates_stride: {stride!r}; expected an integer >= 1")
        dropout = options.get("dropout", 0.1)
        number = isinstance(dropout, int | float) and not isinstance(dropout, bool)
        if not (number and 0 <= dropout < 1):
            problems.append(f"model.decoder.dropout: {dropout!r}; expected a number in [0, 1)")
        return problems

    def pyramid(self, features: Sequence[Tensor]) -> Tensor:
        """The concatenated branches (1x1, dilated 3x3s, image pooling) on the coarsest level."""
        x = features[self.level]
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])
        return torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.block(self.project(self.pyramid(features))))
