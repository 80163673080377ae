"""Gradient-balancing plugins: how the task losses become one update."""

from mtl.balancers.base import BalanceContext, Balancer

__all__ = ["Balancer", "BalanceContext"]
