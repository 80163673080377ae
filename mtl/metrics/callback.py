"""Connects the module's `TaskMetrics` to the trainer: metric schedules and per-class tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from mtl.metrics.collection import TaskMetrics
from mtl.metrics.subsets import evaluation_dataset, scored_ids
from mtl.metrics.tables import named_tables
from mtl.steps import logging_step


def _task_metrics(module: L.LightningModule) -> TaskMetrics | None:
    metrics = getattr(module, "metrics", None)
    return metrics if isinstance(metrics, TaskMetrics) else None


class MetricsCallback(L.Callback):
    """Tells `TaskMetrics` which evaluation epoch starts (so costly metrics such as edge matching
    run only when scheduled) and which images each task is scored on (a dataset's evaluation
    list, see ``mtl.metrics.subsets``), and logs per-class tables through loggers that have
    ``log_table`` (W&B) after each evaluation epoch.

    Args:
        class_names: class names per classification task (``data.class_names``).
    """

    def __init__(self, class_names: Mapping[str, Sequence[str]] | None = None) -> None:
        self.class_names = dict(class_names or {})

    def _begin(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        metrics = _task_metrics(module)
        if metrics is None:
            return
        if trainer.sanity_checking:
            stage = "sanity"  # never a scheduled epoch
        fitting = trainer.state.fn == TrainerFn.FITTING
        metrics.begin_epoch(stage, trainer.current_epoch, fitting)
        dataset = evaluation_dataset(trainer)
        for task in metrics.metrics:
            metrics.score_only(task, scored_ids(dataset, task))

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._begin(trainer, module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._begin(trainer, module, "test")

    def _log_tables(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        metrics = _task_metrics(module)
        if metrics is None or trainer.sanity_checking or not metrics.tables:
            return
        for key, rows in named_tables(metrics.tables, self.class_names).items():
            for logger in trainer.loggers:
                if hasattr(logger, "log_table"):
                    logger.log_table(
                        key=f"{stage}/{key}",
                        columns=["class_index", "class", "value"],
                        data=rows,
                        step=logging_step(trainer),  # the step of the epoch's scores
                    )

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._log_tables(trainer, module, "val")

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._log_tables(trainer, module, "test")
