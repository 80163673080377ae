"""Gradient-balancing plugins: how the task losses become one update."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult

__all__ = ["BalanceContext", "Balancer", "BalanceResult", "build_balancer"]


def build_balancer(
    balancer: DictConfig,
    flat: DictConfig | None,
    tasks: Sequence[str],
    smoothing: DictConfig | None = None,
) -> Balancer:
    """The configured balancer (told the number of tasks or their names if it asks for them),
    its weights smoothed when ``smoothing`` names a method, wrapped in the flat-region method
    when ``flat`` names one."""
    extra, parameters = {}, inspect.signature(get_class(balancer._target_)).parameters
    if "num_tasks" in parameters:
        extra["num_tasks"] = len(tasks)
    if "tasks" in parameters:
        extra["tasks"] = list(tasks)
    method = instantiate(balancer, **extra)
    if smoothing is not None and smoothing.get("_target_"):
        method = instantiate(smoothing, num_tasks=len(tasks))(method)
    if flat is not None and flat.get("_target_"):
        return instantiate(flat)(method)
    return method
