"""Checks of the composed config, run before any model or data is built."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig

from mtl.tasks import TASKS


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

    import timm  # imported here: timm's import is slow and the task checks do not need it

    backbone = cfg.model.backbone.name
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
        problems.append(
            f"model.backbone.name: '{backbone}' is not a timm model"
            + (f"; similar names: {close}" if close else "")
        )
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise one `ConfigError` listing every problem of `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
