"""Scores of merged and single-task models on the evaluation split, and Δm between them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, open_dict
from torch import Tensor

from mtl.metrics.delta_m import delta_m, task_gains
from mtl.tasks import get_task


def buildable(cfg: DictConfig) -> DictConfig:
    """`cfg` for rebuilding a stored model: no init file and no baselines file (its weights
    come from a checkpoint; the training machine's files may be gone)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model.init_from = None
        cfg.model.compile = False
        cfg.delta_m_baselines = None
    return cfg


def test_scores(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    accelerator: str,
    holdout: bool = False,
) -> dict[str, float]:
    """``trainer.test`` on one device: ``test/<task>/<metric>`` of every task of the module, on
    the evaluation split, or (`holdout`) on the part of the training split that
    ``data.val_fraction`` held out."""
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if holdout:
        results = trainer.test(module, dataloaders=datamodule.holdout_dataloader(), verbose=False)
    else:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in results[0].items()} if results else {}


def baselines_of(single: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from each single-task model's ``test/<task>/<metric>``."""
    out: dict[str, dict[str, float]] = {}
    for task, scores in single.items():
        prefix = f"test/{task}/"
        out[task] = {k[len(prefix) :]: v for k, v in scores.items() if k.startswith(prefix)}
    return out


def with_delta(
    scores: Mapping[str, float], baselines: Mapping, tasks: Sequence[str], prefix: str
) -> dict[str, float]:
    """`scores` plus ``<prefix>delta_m`` and ``<prefix>delta/<task>`` against `baselines`."""
    out = dict(scores)
    for task, gain in task_gains(scores, baselines, tasks, prefix).items():
        out[f"{prefix}delta/{task}"] = gain
    value = delta_m(scores, baselines, tasks, prefix)
    if value is not None:
        out[f"{prefix}delta_m"] = value
    return out


def main_metric(task: str) -> str:
    return get_task(task).main_metric


def training_images(
    datamodule: L.LightningDataModule, batches: int, device: torch.device
) -> Iterator[Tensor]:
    """The images of the first `batches` training batches (for BatchNorm statistics)."""
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i >= batches:
            return
        yield batch["image"].to(device)
