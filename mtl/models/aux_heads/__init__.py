"""Auxiliary heads of training-only tasks: they read the backbone features during training
and are not part of the inference model (``MultiTaskModel.aux_heads``).

An auxiliary head is built as ``head(in_channels=, in_strides=, out_channels=)`` and called as
``head(features, size)`` with the input's (height, width): unlike a decoder, it may need the
input size before its last layers.
"""

from mtl.models.aux_heads.casenet import CASENetHead

__all__ = ["CASENetHead"]
