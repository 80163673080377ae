"""mtl: multi-task learning for dense prediction."""

from mtl.resolvers import register_resolvers

register_resolvers()
