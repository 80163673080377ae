"""Gradient-balancing plugins: how the task losses become one update."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, open_dict

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult

__all__ = ["BalanceContext", "Balancer", "BalanceResult", "available_modes", "build_balancer"]


def build_balancer(
    balancer: DictConfig,
    flat: DictConfig | None,
    tasks: Sequence[str],
    smoothing: DictConfig | None = None,
) -> Balancer:
    """The configured balancer (told the number of tasks or their names if it asks for them),
    its weights smoothed when ``smoothing`` names a method, wrapped in the flat-region method
    when ``flat`` names one."""
    balancer = balancer.copy()
    with open_dict(balancer):  # options of every Gramian method, not constructor arguments
        equalize_levels = bool(balancer.pop("equalize_levels", False))
        jacobian = balancer.pop("jacobian", "stored")
    extra, parameters = {}, inspect.signature(get_class(balancer._target_)).parameters
    if "num_tasks" in parameters:
        extra["num_tasks"] = len(tasks)
    if "tasks" in parameters:
        extra["tasks"] = list(tasks)
    method = instantiate(balancer, **extra)
    if equalize_levels:
        method.equalize_levels = True
    from mtl.balancers.gramian import GramianMethod  # here: gramian imports this package

    for module in method.modules():  # the Gramian method, also inside a composite (imtl_full)
        if isinstance(module, GramianMethod):
            module.jacobian = jacobian
    if smoothing is not None and smoothing.get("_target_"):
        method = instantiate(smoothing, num_tasks=len(tasks))(method)
    if flat is not None and flat.get("_target_"):
        return instantiate(flat)(method)
    return method


def available_modes(method: type[Balancer]) -> tuple[str, ...]:
    """The ``balancer.mode`` values a method offers: its class attribute ``modes``, else both
    ``param`` and ``rep`` for gradient methods and ``param`` for loss weighting."""
    default = ("param", "rep") if method.needs_task_gradients else ("param",)
    return tuple(getattr(method, "modes", default))
