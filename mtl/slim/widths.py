"""Width configurations of a slimmed model: set them, run under one, export one as a dense model.

A width configuration maps each role to a width: ``encoder`` (the shared backbone) and each
task (its decoder), e.g. ``{"encoder": 0.5, "semseg": 1.0, "depth": 0.5}``. Roles left out keep
their width.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from mtl.slim.layers import SlimDim, Slimmable

#: The role of the shared backbone's slim layers (the others are task names).
ENCODER = "encoder"
#: Attribute put on a timm attention module whose heads follow the width.
HEADS = "slim_heads"


def slim_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Slimmable)]


def roles(model: nn.Module) -> list[str]:
    """The roles of `model`'s slim layers, encoder first."""
    found = {m.role for _, m in slim_layers(model)}
    return sorted(found, key=lambda r: (r != ENCODER, r))


def current_widths(model: nn.Module) -> dict[str, float]:
    return {m.role: m.width for _, m in slim_layers(model)}


def set_widths(model: nn.Module, widths: Mapping[str, float]) -> None:
    """Run every slim layer of a role in `widths` at that width (attention modules: the number
    of heads follows their projections)."""
    for module in model.modules():
        if isinstance(module, Slimmable) and module.role in widths:
            module.width = float(widths[module.role])
        dim: SlimDim | None = getattr(module, HEADS, None)
        if dim is not None and module.qkv.role in widths:
            module.attn_dim = dim.active(float(widths[module.qkv.role]))
            module.num_heads = module.attn_dim // module.head_dim


@contextmanager
def at_widths(model: nn.Module, widths: Mapping[str, float]) -> Iterator[None]:
    """Run `model` at `widths` inside the block; the previous widths come back after it."""
    before = current_widths(model)
    set_widths(model, widths)
    try:
        yield
    finally:
        set_widths(model, before)


def export_dense(model: nn.Module, widths: Mapping[str, float]) -> nn.Module:
    """Replace, in place, every slim layer by the dense layer of its width in `widths`: the
    model becomes really smaller (parameters and FLOPs), and computes what the slim model
    computes at those widths."""
    set_widths(model, widths)
    for name, module in slim_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.dense())
    for module in model.modules():
        if hasattr(module, HEADS):
            delattr(module, HEADS)
    return model
