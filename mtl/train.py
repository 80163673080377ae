"""Train and evaluate one configuration (the body of the `train.py` entry point)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from mtl.balancers import build_balancer
from mtl.config import validate_config
from mtl.data.datamodule import MultiTaskDataModule
from mtl.models.multitask import MultiTaskModel
from mtl.module import MultiTaskModule
from mtl.tasks import get_task

log = logging.getLogger(__name__)


def build_datamodule(data: DictConfig) -> MultiTaskDataModule:
    """The datamodule of `data` (a `conf/data/*.yaml` node)."""
    return MultiTaskDataModule(
        dataset=instantiate(data.dataset),
        tasks=list(data.tasks),
        batch_size=data.batch_size,
        train_transform=instantiate(data.train_transform),
        val_transform=instantiate(data.val_transform),
        prepare=instantiate(data.prepare) if data.get("prepare") else None,
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
    )


def build_model(cfg: DictConfig) -> MultiTaskModel:
    """Backbone and one head per task, with output channels from the task registry."""
    num_classes = OmegaConf.to_container(cfg.data.get("num_classes") or {})
    channels = {task: get_task(task).channels(num_classes) for task in cfg.data.tasks}
    return instantiate(cfg.model, task_channels=channels, _convert_="all")


def build_module(cfg: DictConfig) -> MultiTaskModule:
    return MultiTaskModule(
        model=build_model(cfg),
        balancer=build_balancer(cfg.balancer, cfg.get("flat"), list(cfg.data.tasks)),
        loss_weights=OmegaConf.to_container(cfg.data.get("loss_weights") or {}),
        num_classes=OmegaConf.to_container(cfg.data.get("num_classes") or {}),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        grad_clip_norm=cfg.optim.get("grad_clip_norm"),
        seed=cfg.seed,
        diagnostics_every=cfg.get("diagnostics_every_n_steps", 0),
    )


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    """Trainable (requires grad) and total parameter counts."""
    params = list(module.parameters())
    return {
        "params/trainable": sum(p.numel() for p in params if p.requires_grad),
        "params/total": sum(p.numel() for p in params),
    }


def scores_table(scores: dict[str, float], tasks: list[str]) -> Table:
    """Final scores as a table: one row per task and metric, with its direction."""
    table = Table(title="Final validation scores")
    for column in ("task", "metric", "value", "better"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task in tasks:
        directions = get_task(task).higher_is_better
        for key, value in scores.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[1] == task:
                better = {True: "higher", False: "lower"}.get(directions.get(parts[2], False))
                table.add_row(task, parts[2], f"{value:.4f}", better)
    if "val/loss" in scores:
        table.add_row("all", "loss", f"{scores['val/loss']:.4f}", "lower")
    return table


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (unless ``cfg.train`` is false), then validate; write the run files; return scores."""
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    module = build_module(cfg)
    counts = count_parameters(module.model)
    log.info(
        "parameters: %s trainable of %s",
        f"{counts['params/trainable']:,}",
        f"{counts['params/total']:,}",
    )

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        checkpoint = (
            None if trainer.fast_dev_run else _evaluation_checkpoint(trainer, cfg.eval_ckpt)
        )
    else:
        checkpoint = cfg.get("ckpt_path")
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)
    scores = {k: float(v) for k, v in results[0].items()} if results else {}
    scores.update(counts)

    (output_dir / "metrics.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
    if trainer.is_global_zero:
        Console().print(scores_table(scores, list(cfg.data.tasks)))
        log.info("run directory: %s", output_dir)
    return scores


def _evaluation_checkpoint(trainer: L.Trainer, which: str) -> str | None:
    """Path of the best or last checkpoint of this fit (None: keep the weights in memory)."""
    if which not in ("best", "last"):
        raise ValueError(f"eval_ckpt: '{which}'; expected 'best' or 'last'")
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    path = callback.best_model_path if which == "best" else callback.last_model_path
    return path or callback.last_model_path or None
