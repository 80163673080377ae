"""The simplest head: all scales fused, one 3x3 conv block, a 1x1 classifier."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl.models.decoders.layers import conv_bn_act, upsample_and_concat


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
