"""All validation/test scores of a run: one set of metrics per task, flattened for logging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl.tasks import get_task


class TaskMetrics(nn.Module):
    """The registry's metrics of every task, updated per batch and computed per epoch.

    ``compute()`` returns flat keys ``<task>/<score>`` with scalar values; non-scalar results
    (such as per-class IoU vectors) are left to ``compute_tables()``.
    """

    def __init__(self, tasks: Sequence[str], num_classes: Mapping[str, int]) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict(
            {t: nn.ModuleDict(get_task(t).metrics(num_classes.get(t))) for t in tasks}
        )

    def update(self, preds: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        for task, metrics in self.metrics.items():
            for metric in metrics.values():
                metric.update(preds[task], batch[task])

    def _computed(self) -> dict[str, dict[str, Tensor]]:
        results: dict[str, dict[str, Tensor]] = {}
        for task, metrics in self.metrics.items():
            for name, metric in metrics.items():
                values = metric.compute()
                results.setdefault(task, {}).update(
                    values if isinstance(values, dict) else {name: values}
                )
        return results

    def compute(self) -> dict[str, Tensor]:
        """Scalar scores as ``{"<task>/<score>": value}`` (dataset-level, synced across ranks)."""
        return {
            f"{task}/{key}": value.float()
            for task, values in self._computed().items()
            for key, value in values.items()
            if value.numel() == 1
        }

    def reset(self) -> None:
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.reset()
