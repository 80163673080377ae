"""Gradient-balancing plugins: how the task losses become one update."""

from mtl.balancers.base import Balancer, BalanceContext

__all__ = ["Balancer", "BalanceContext"]
