"""What a resumed run may change in how it trains.

A checkpoint holds the balancer's state and the optimiser's state of the run that wrote it.
Another balancer or optimiser cannot take them over (Lightning fails on the missing state, or
a step later), and Lightning restores the optimiser's hyper-parameters from the checkpoint, so
a changed learning rate would be ignored while ``config.yaml`` records it. So, on resume:

- another balancer, flat-region wrapper, optimiser class or optimiser argument (momentum,
  betas, ...) is refused before anything is built (`check_training`), naming each difference;
- a changed ``optim.optimizer.lr`` or ``weight_decay`` is applied from the step reached and
  logged (`ApplyOptimizerSettings`): the schedule continues as a run started with the new base
  rate would have it at that step.

The training settings are compared on the configs stored in checkpoints (``mtl_config``), so
checkpoints written before this check are covered too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L

from mtl.checkpoint import CONFIG_KEY, IncompatibleCheckpointError
from mtl.optim import rebuild_schedule

log = logging.getLogger(__name__)

#: Optimiser arguments a resumed run applies instead of refusing.
APPLIED = ("lr", "weight_decay")
_NOT_ARGUMENTS = ("_target_", "_partial_", *APPLIED)


def _target(node: Any) -> str | None:
    return node.get("_target_") if isinstance(node, Mapping) else None


def training_signature(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must keep, from a resolved config (plain containers): the balancer,
    the flat-region and smoothing wrappers, the optimiser class and its arguments other than
    `APPLIED`."""
    optimizer = (config.get("optim") or {}).get("optimizer") or {}
    signature: dict[str, Any] = {
        "balancer": _target(config.get("balancer")),
        "flat": _target(config.get("flat")),
        "smoothing": _target(config.get("smoothing")),  # CR-MOGM keeps the averaged weights
        "optimizer": _target(optimizer),
    }
    for key, value in optimizer.items():
        if key not in _NOT_ARGUMENTS:
            signature[f"optimizer.{key}"] = value
    return signature


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)


def training_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs (a setting absent on one side is ``unset``)."""
    return [
        f"{key}: checkpoint {_shown(saved.get(key))}, config {_shown(current.get(key))}"
        for key in dict.fromkeys([*saved, *current])
        if saved.get(key) != current.get(key)
    ]


def check_training(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any], source: str, hint: str
) -> None:
    """Raise `IncompatibleCheckpointError` naming each difference between the training
    settings of `checkpoint` (its stored config) and `config`, then `hint`. No check for a
    checkpoint without a stored config."""
    stored = checkpoint.get(CONFIG_KEY)
    if not isinstance(stored, Mapping):
        return
    differences = training_differences(training_signature(stored), training_signature(config))
    if differences:
        raise IncompatibleCheckpointError(
            f"{source} was trained with another balancer or optimiser:\n  "
            + "\n  ".join([*differences, hint])
        )


class ApplyOptimizerSettings(L.Callback):
    """On a resumed fit, sets the configured learning rate and weight decay on the restored
    optimiser where they differ from the checkpoint's, and logs each change. With a schedule,
    the new rate is its base rate and the schedule is rebuilt at the step reached (as
    ``mtl.optim.rebuild_schedule`` does for a changed length).

    Args:
        lr / weight_decay: the configured values (None: leave the checkpoint's).
    """

    def __init__(self, lr: float | None = None, weight_decay: float | None = None) -> None:
        self.settings = {"lr": lr, "weight_decay": weight_decay}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None or not trainer.optimizers:
            return
        schedules = trainer.lr_scheduler_configs
        rebuild = False
        for name, value in self.settings.items():
            if value is None:
                continue
            # with a schedule, the base rate is `initial_lr`; `lr` is the scheduled rate
            key = "initial_lr" if name == "lr" and schedules else name
            groups = [g for g in trainer.optimizers[0].param_groups if key in g]
            previous = {float(g[key]) for g in groups}
            if not groups or previous == {float(value)}:
                continue
            for group in groups:
                group[key] = value
                if name == "lr" and not schedules:
                    group["initial_lr"] = value
            rebuild |= name == "lr" and bool(schedules)
            log.info(
                "optim.optimizer.%s: %s applied from step %d (the checkpoint's was %s)",
                name,
                value,
                trainer.global_step,
                ", ".join(str(v) for v in sorted(previous)),
            )
        factory = getattr(pl_module, "scheduler_factory", None)
        total = getattr(pl_module, "schedule_steps", None)
        if rebuild and factory is not None and total is not None:
            config = schedules[0]
            config.scheduler = rebuild_schedule(factory, config.scheduler, total)
