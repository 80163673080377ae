"""Decoders: from the backbone's multi-scale NCHW features to each task's prediction.

One module per decoder; configs name the class (``conf/model/decoder/<name>.yaml``). Per-task
heads and multi-task decoders are told apart in `base`.
"""

from mtl.models.decoders.aspp import ASPPDecoder
from mtl.models.decoders.base import (
    MultiTaskDecoder,
    PerTaskDecoders,
    TaskInputs,
    build_decoder,
    is_multitask,
)
from mtl.models.decoders.conv import ConvDecoder
from mtl.models.decoders.hrnet import HRNetDecoder
from mtl.models.decoders.layers import NORMS, conv_bn_act, normalisation, upsample_and_concat
from mtl.models.decoders.mlore import MLoRE
from mtl.models.decoders.taskexpert import TaskExpertDecoder

__all__ = [
    "NORMS",
    "ASPPDecoder",
    "ConvDecoder",
    "HRNetDecoder",
    "MLoRE",
    "MultiTaskDecoder",
    "PerTaskDecoders",
    "TaskExpertDecoder",
    "TaskInputs",
    "build_decoder",
    "conv_bn_act",
    "is_multitask",
    "normalisation",
    "upsample_and_concat",
]
