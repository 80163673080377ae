"""All validation/test scores of a run: one set of metrics per task, flattened for logging."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from mtl.metrics.delta_m import Baselines, delta_m, task_gains
from mtl.tasks import get_task, reported


def _wants_meta(metric: Metric) -> bool:
    return bool(getattr(metric, "uses_meta", False))


class TaskMetrics(nn.Module):
    """The registry's metrics of every task, updated per batch and computed per epoch.

    Args:
        tasks: the tasks of the run.
        num_classes: class count per classification task.
        options: per-task metric options (``data.metric_options``), passed to the registry's
            factory as keyword arguments, e.g. ``{"sal": {"maxf": "B"}}``.
        baselines: single-task scores ``{task: {metric: value}}``; when given, ``compute()`` adds
            ``delta_m`` (if every task's main metric was computed) and ``delta/<task>``.

    ``compute()`` returns flat keys ``<task>/<score>`` with scalar values (and ``<task>/loss``,
    ``loss`` once ``update_losses`` was called); non-scalar results
    (per-class IoU vectors) are kept in ``tables`` until the next ``compute()``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        num_classes: Mapping[str, int],
        options: Mapping[str, Mapping[str, Any]] | None = None,
        baselines: Baselines | None = None,
    ) -> None:
        super().__init__()
        options = options or {}
        tasks = reported(tasks)  # training-only tasks have no scores
        self.metrics = nn.ModuleDict(
            {
                t: nn.ModuleDict(get_task(t).metrics(num_classes.get(t), **options.get(t, {})))
                for t in tasks
            }
        )
        # evaluation losses as means weighted by batch size: torchmetrics sums value and weight
        # over ranks, exact for uneven shares (Lightning's logged means are not: it averages
        # the integer batch counts over ranks with truncation)
        self.losses = nn.ModuleDict(
            {key: MeanMetric(nan_strategy="disable") for key in [*tasks, "total"]}
        )
        self.baselines = baselines
        self.tables: dict[str, Tensor] = {}

    def begin_epoch(self, stage: str, epoch: int, fitting: bool) -> None:
        """Tell metrics with a schedule (edge matching) which evaluation epoch comes next."""
        for metrics in self.metrics.values():
            for metric in metrics.values():
                if hasattr(metric, "begin_epoch"):
                    metric.begin_epoch(stage, epoch, fitting)

    def score_only(self, task: str, ids: Collection[str] | None) -> None:
        """Score ``task`` on the images with these ids only (None: all), where its metrics
        support a subset (``scored_ids``: edge matching)."""
        for metric in self.metrics[task].values() if task in self.metrics else ():
            if hasattr(metric, "scored_ids"):
                metric.scored_ids = None if ids is None else frozenset(ids)

    def update(self, preds: Mapping[str, Tensor], batch: Mapping[str, Any]) -> None:
        for task, metrics in self.metrics.items():
            for metric in metrics.values():
                if _wants_meta(metric):
                    metric.update(preds[task], batch[task], meta=batch.get("meta"))
                else:
                    metric.update(preds[task], batch[task])

    def update_losses(self, losses: Mapping[str, Tensor], total: Tensor, batch_size: int) -> None:
        """Add one batch's per-task losses and weighted total (``<task>/loss``, ``loss``)."""
        for key, value in [*losses.items(), ("total", total)]:
            self.losses[key].update(value.detach().float(), weight=batch_size)

    def _computed(self) -> dict[str, dict[str, Tensor]]:
        results: dict[str, dict[str, Tensor]] = {}
        for task, metrics in self.metrics.items():
            for name, metric in metrics.items():
                if not getattr(metric, "active", True):
                    continue
                values = metric.compute()
                results.setdefault(task, {}).update(
                    values if isinstance(values, dict) else {name: values}
                )
        return results

    def compute(self) -> dict[str, Tensor]:
        """Scalar scores as ``{"<task>/<score>": value}`` (dataset-level, synced across ranks)."""
        scores: dict[str, Tensor] = {}
        self.tables = {}
        for task, values in self._computed().items():
            for key, value in values.items():
                if value.numel() == 1:
                    scores[f"{task}/{key}"] = value.float()
                else:
                    self.tables[f"{task}/{key}"] = value.detach().cpu()
        for key, mean in self.losses.items():
            if mean.update_called:
                scores["loss" if key == "total" else f"{key}/loss"] = mean.compute().float()
        if self.baselines:
            scores.update(self._gains(scores))
        return scores

    def _gains(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``delta_m`` and ``delta/<task>`` against the baselines."""
        values = {key: float(value) for key, value in scores.items()}
        tasks = list(self.metrics)
        gains = {f"delta/{t}": g for t, g in task_gains(values, self.baselines, tasks).items()}
        overall = delta_m(values, self.baselines, tasks)
        if overall is not None:
            gains["delta_m"] = overall
        return {key: torch.tensor(value, dtype=torch.float32) for key, value in gains.items()}

    def reset(self) -> None:
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.reset()
        for mean in self.losses.values():
            mean.reset()
