"""Slimmable widths: one trained model that runs at any trained encoder and decoder width.

`layers` holds the slim layers, `apply` the recipe that swaps them into a built model
(``conf/model/slim/on.yaml``), `widths` the width configurations, `training` the sandwich rule
with configuration-invariant distillation, `cost` the FLOPs table and `search` the choice of a
configuration for a compute budget and a task preference (``python -m mtl.control``).
"""

from mtl.slim.apply import Slimming
from mtl.slim.layers import SlimBatchNorm2d, SlimConv2d, SlimDim, SlimGroupNorm, SlimLinear
from mtl.slim.widths import ENCODER, at_widths, export_dense, roles, set_widths

__all__ = [
    "ENCODER",
    "SlimBatchNorm2d",
    "SlimConv2d",
    "SlimDim",
    "SlimGroupNorm",
    "SlimLinear",
    "Slimming",
    "at_widths",
    "export_dense",
    "roles",
    "set_widths",
]
