"""mtl: multi-task learning for dense prediction.

``mtl.load(path)`` loads a trained model (`mtl.api`); it is imported on first use, so that
``import mtl`` stays light.
"""

from __future__ import annotations

from typing import Any

from mtl.resolvers import register_resolvers

register_resolvers()

__all__ = ["LoadedModel", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mtl import api

        return getattr(api, name)
    raise AttributeError(f"module 'mtl' has no attribute {name!r}")
