"""Width-slimmable layers: each runs at a chosen width using the first channels of its weights.

A layer's slimmable dimension is split into `groups` equal blocks (1 for a plain hidden layer,
3 for the q/k/v rows of an attention projection, L for the concatenation of L projected scales);
at width w every block keeps its first ``unit * ceil(w * units)`` channels, so that a width
always keeps whole attention heads or whole normalisation groups. At width 1 every layer is the
dense layer it replaced, computed with the same weights and the same calls.

No library provides slimmable layers for timm models (torch's pruning utilities mask weights and
keep the full cost), hence these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SlimDim:
    """A slimmable dimension of `size` channels: `groups` blocks, each of whole `unit`s."""

    size: int
    groups: int = 1
    unit: int = 1

    def __post_init__(self) -> None:
        if self.size % (self.groups * self.unit):
            raise ValueError(f"{self.size} channels do not split into {self.groups} x {self.unit}")

    def active(self, width: float) -> int:
        """Channels kept per group at `width` (at least one unit)."""
        units = self.size // (self.groups * self.unit)
        return self.unit * min(units, max(1, math.ceil(width * units - 1e-9)))

    def channels(self, width: float) -> int:
        """Channels kept in all at `width`."""
        return self.groups * self.active(width)

    def index(self, width: float) -> Tensor | slice:
        """The kept channels: a slice for one group, else an index tensor."""
        keep = self.active(width)
        if self.groups == 1:
            return slice(0, keep)
        block = self.size // self.groups
        return torch.cat([torch.arange(g * block, g * block + keep) for g in range(self.groups)])


class Slimmable:
    """What every slim layer carries: the width role it follows (``encoder`` or a task) and
    the width it runs at now (set through `mtl.slim.widths.set_widths`)."""

    role: str = "encoder"
    width: float = 1.0


class SlimWeighted(Slimmable):
    """A slim layer with a weight whose dim 0 (outputs) and dim 1 (inputs) follow the width."""

    weight: Tensor
    bias: Tensor | None
    slim_in: SlimDim | None
    slim_out: SlimDim | None

    def sliced(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias of the dense layer at the current width."""
        weight, bias = self.weight, self.bias
        if self.width < 1 and self.slim_out is not None:
            keep = self.slim_out.index(self.width)
            weight = _select(weight, 0, keep)
            bias = _select(bias, 0, keep) if bias is not None else None
        if self.width < 1 and self.slim_in is not None:
            weight = _select(weight, 1, self.slim_in.index(self.width))
        return weight, bias


def _select(weight: Tensor, dim: int, keep: Tensor | slice) -> Tensor:
    if isinstance(keep, slice):
        return weight.narrow(dim, 0, keep.stop) if keep.stop != weight.shape[dim] else weight
    return weight.index_select(dim, keep.to(weight.device))


class SlimLinear(nn.Linear, SlimWeighted):
    """`nn.Linear` whose input and/or output features follow the width (None: fixed)."""

    def __init__(
        self, base: nn.Linear, role: str, slim_in: SlimDim | None, slim_out: SlimDim | None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.role, self.slim_in, self.slim_out = role, slim_in, slim_out

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *self.sliced())

    def dense(self) -> nn.Linear:
        """A plain `nn.Linear` of the current width holding copies of the kept weights."""
        weight, bias = self.sliced()
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.weight.data.copy_(weight)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer


class SlimConv2d(nn.Conv2d, SlimWeighted):
    """`nn.Conv2d` (no channel groups) whose input and/or output channels follow the width."""

    def __init__(
        self, base: nn.Conv2d, role: str, slim_in: SlimDim | None, slim_out: SlimDim | None
    ) -> None:
        if base.groups != 1:
            raise ValueError("only convolutions without channel groups can be slimmed")
        nn.Module.__init__(self)
        for name in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode",
        ):  # fmt: skip
            setattr(self, name, getattr(base, name))
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice
        self.weight, self.bias = base.weight, base.bias
        self.role, self.slim_in, self.slim_out = role, slim_in, slim_out

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, *self.sliced())

    def dense(self) -> nn.Conv2d:
        weight, bias = self.sliced()
        layer = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=bias is not None,
            padding_mode=self.padding_mode,
        )
        layer.weight.data.copy_(weight)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer


class SlimBatchNorm2d(nn.BatchNorm2d, Slimmable):
    """Switchable batch norm: the full width uses the original BatchNorm's parameters and
    statistics, every narrower trained width its own BatchNorm (``narrow[<channels>]``), since
    the statistics of a channel change with the width of the network that computes it."""

    def __init__(self, base: nn.BatchNorm2d, role: str, dim: SlimDim, widths: list[float]) -> None:
        nn.Module.__init__(self)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, name, getattr(base, name))
        self.weight, self.bias = base.weight, base.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(base, name))
        self.role, self.dim = role, dim
        counts = sorted({dim.channels(w) for w in widths} - {dim.size})
        self.narrow = nn.ModuleDict(
            {
                str(n): nn.BatchNorm2d(n, base.eps, base.momentum, base.affine).to(
                    base.weight.device if base.weight is not None else None
                )
                for n in counts
            }
        )

    def _norm(self) -> nn.BatchNorm2d | None:
        channels = self.dim.channels(self.width)
        if channels == self.num_features:
            return None
        if str(channels) not in self.narrow:
            raise ValueError(
                f"width {self.width} ({channels} channels) is not one of the trained widths "
                f"(channels {sorted(int(k) for k in self.narrow)} and {self.num_features})"
            )
        return self.narrow[str(channels)]

    def forward(self, x: Tensor) -> Tensor:
        norm = self._norm()
        return super().forward(x) if norm is None else norm(x)

    def dense(self) -> nn.BatchNorm2d:
        norm = self._norm()
        if norm is not None:
            return norm
        layer = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine)
        layer.load_state_dict(nn.BatchNorm2d.state_dict(self), strict=False)
        return layer


class SlimGroupNorm(nn.GroupNorm, Slimmable):
    """Group norm at any width: the group size stays fixed, so a narrower layer normalises its
    first groups exactly as the full layer does (needs widths in whole groups: `SlimDim.unit`)."""

    def __init__(self, base: nn.GroupNorm, role: str, dim: SlimDim) -> None:
        nn.Module.__init__(self)
        for name in ("num_groups", "num_channels", "eps", "affine"):
            setattr(self, name, getattr(base, name))
        self.weight, self.bias = base.weight, base.bias
        self.role, self.dim = role, dim

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        groups = channels * self.num_groups // self.num_channels
        weight = self.weight[:channels] if self.weight is not None else None
        bias = self.bias[:channels] if self.bias is not None else None
        return F.group_norm(x, groups, weight, bias, self.eps)

    def dense(self) -> nn.GroupNorm:
        channels = self.dim.channels(self.width)
        groups = channels * self.num_groups // self.num_channels
        layer = nn.GroupNorm(groups, channels, self.eps, self.affine)
        if self.affine:
            layer.weight.data.copy_(self.weight[:channels])
            layer.bias.data.copy_(self.bias[:channels])
        return layer
