"""SBCB's semantic-boundary head (Ishikawa & Aoki, Sensors 2023): CASENet-style side outputs
on every backbone level, fused per class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.decoders.layers import normalisation


class SideOutput(nn.Module):
    """1x1 conv (no bias) + norm + ReLU at the feature's resolution, bilinear resize to the
    input size, reflection pad + 3x3 conv (no bias, no norm, no activation): logits."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            normalisation(norm, out_channels),
            nn.ReLU(inplace=True),
        )
        self.refine = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(out_channels, out_channels, 3, bias=False)
        )

    def forward(self, feature: Tensor, size: Sequence[int]) -> Tensor:
        reduced = F.interpolate(
            self.reduce(feature), size=tuple(size), mode="bilinear", align_corners=False
        )
        return self.refine(reduced)


class CASENetHead(nn.Module):
    """K-class boundary logits from every backbone level.

    The deepest level (largest stride; the last listed among equal strides, e.g. ViT levels)
    gives K class logits ("last"); every other level one logit ("side"). For each class k,
    [last_k, side_1, ..., side_n] go through a grouped 1x1 conv (groups = K) to the fused
    logit. Returns [B, 2K, H, W] at the input size: the fused logits, then the last ones (the
    loss supervises both).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        out_channels: int,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        order = sorted(range(len(in_strides)), key=lambda i: in_strides[i])
        self.last_index, self.side_indices = order[-1], order[:-1]
        self.num_classes = out_channels
        self.sides = nn.ModuleList(SideOutput(in_channels[i], 1, norm) for i in self.side_indices)
        self.last = SideOutput(in_channels[self.last_index], out_channels, norm)
        groups = 1 + len(self.side_indices)
        self.fuse = nn.Conv2d(out_channels * groups, out_channels, 1, groups=out_channels)

    def forward(self, features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        last = self.last(features[self.last_index], size)  # [B, K, H, W]
        sides = [
            side(features[i], size)
            for side, i in zip(self.sides, self.side_indices, strict=True)
        ]
        batch, classes, height, width = last.shape
        # per class k: last_k, then every side output
        grouped = torch.cat(
            [last.unsqueeze(2), *(s.unsqueeze(1).expand(-1, classes, -1, -1, -1) for s in sides)],
            dim=2,
        ).reshape(batch, -1, height, width)
        return torch.cat([self.fuse(grouped), last], dim=1)
