"""Checks of the composed config, run before any model or data is built."""

from __future__ import annotations

import difflib

from hydra.utils import get_class
from omegaconf import DictConfig

from mtl.tasks import TASKS

#: Strategies that shard parameters across processes.
SHARDED = ("fsdp", "deepspeed")


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of `cfg`, one line each naming the key, the value and what is allowed."""
    problems: list[str] = []
    data = cfg.data
    available = list(data.get("available_tasks") or [])
    for task in data.tasks:
        if task not in TASKS:
            problems.append(f"data.tasks: unknown task '{task}'; registered tasks: {sorted(TASKS)}")
        elif task not in available:
            problems.append(
                f"data.tasks: task '{task}' is not provided by dataset '{data.name}'; "
                f"available: {available}"
            )
        elif TASKS[task].out_channels is None and task not in (data.get("num_classes") or {}):
            problems.append(f"data.num_classes.{task}: missing; task '{task}' needs a class count")
    if not data.tasks:
        problems.append("data.tasks: empty; choose at least one of " + str(available))
    for task in data.get("loss_weights") or {}:
        if task not in available:
            problems.append(f"data.loss_weights.{task}: '{task}' is not a task of '{data.name}'")
    if not isinstance(data.batch_size, int) or data.batch_size <= 0:
        problems.append(f"data.batch_size: {data.batch_size!r}; expected a positive integer")
    else:
        devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
        if isinstance(devices, int) and isinstance(nodes, int) and devices > 0:
            processes = devices * nodes
            if data.batch_size % processes:
                problems.append(
                    f"data.batch_size: {data.batch_size} is the global batch and must be divisible"
                    f" by trainer.devices x trainer.num_nodes = {processes}"
                )

    problems += _balancer_problems(cfg)

    import timm  # imported here: timm's import is slow and the task checks do not need it

    backbone = cfg.model.backbone.name
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
        problems.append(
            f"model.backbone.name: '{backbone}' is not a timm model"
            + (f"; similar names: {close}" if close else "")
        )
    else:
        problems += _adapter_problems(cfg)
    return problems


def _adapter_problems(cfg: DictConfig) -> list[str]:
    """Adapter options out of range, or an adapter the backbone does not support."""
    adapter = cfg.model.get("adapter")
    if not adapter or not adapter.get("_target_"):
        return []
    from omegaconf import OmegaConf

    from mtl.models.adapters.checks import adapter_problems

    return adapter_problems(
        OmegaConf.to_container(adapter, resolve=True),
        OmegaConf.to_container(cfg.model.backbone, resolve=True),
    )


def _balancer_problems(cfg: DictConfig) -> list[str]:
    """Balancer mode, flat-region wrapper and training strategy that cannot work together."""
    balancer = cfg.balancer
    try:
        method = get_class(balancer._target_)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"balancer._target_: cannot import '{balancer._target_}' ({error})"]
    name = method.__name__
    mode = balancer.get("mode", "param")
    flat = bool((cfg.get("flat") or {}).get("_target_"))
    strategy = str(cfg.trainer.get("strategy", "auto")).lower()
    problems = []
    if mode not in ("param", "rep"):
        problems.append(f"balancer.mode: {mode!r}; expected 'param' or 'rep'")
    if mode == "rep" and not method.needs_task_gradients:
        problems.append(
            f"balancer.mode: 'rep' is for gradient methods; {name} only weights losses "
            "(use balancer.mode=param)"
        )
    if mode == "rep" and (cfg.model.get("adapter") or {}).get("task_aware", False):
        problems.append(
            "balancer.mode: 'rep' needs one shared representation, but the adapter is "
            "task-aware (per-task features); use balancer.mode=param"
        )
    if mode == "rep" and flat:
        problems.append("balancer.mode: 'rep' cannot be combined with flat=sam|asam; use param")
    precision = str(cfg.trainer.get("precision", "32-true"))
    if (method.needs_task_gradients or flat) and precision.startswith("16"):
        problems.append(
            f"trainer.precision: '{precision}' scales the loss for float16, and per-task "
            f"gradients of {name} would be aggregated before unscaling; use bf16-mixed or 32-true"
        )
    if (method.needs_task_gradients or flat) and any(s in strategy for s in SHARDED):
        problems.append(
            f"trainer.strategy: '{strategy}' shards parameters, so per-task gradients of {name}"
            f"{' with flat regions' if flat else ''} cannot be exact; use ddp or a loss-weighting "
            "balancer (equal, uncertainty, dwa, rlw, famo)"
        )
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise one `ConfigError` listing every problem of `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
