"""Representation regularisers: terms on the shared features that any balancer composes with.

A regulariser is not a task loss and takes no part in gradient surgery: its gradient is added,
with weight 1, to the update the balancer chose (``regularizer=<name>``, ``conf/regularizer/``).
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from mtl.regularizers.base import RepresentationRegularizer

__all__ = ["RepresentationRegularizer", "build_regularizer"]


def build_regularizer(node: DictConfig | None) -> RepresentationRegularizer | None:
    """The configured regulariser, or None (``regularizer=none``)."""
    if node is None or not node.get("_target_"):
        return None
    return instantiate(node)
