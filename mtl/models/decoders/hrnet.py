"""HRNet-style head: every scale projected, fused at the finest resolution."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl.models.decoders.layers import conv_bn_act, upsample_and_concat


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
