"""Metric factories of the task registry: ``factory(num_classes, **options) -> {name: Metric}``.

``options`` are the task's entry of ``data.metric_options`` (for example
``{"sal": {"maxf": "B"}, "edge": {"max_dist": 0.011}}``); an unknown option is a TypeError that
names it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torchmetrics import Metric

from mtl.metrics.boundary import pyedgeeval_available
from mtl.metrics.depth import DepthScores
from mtl.metrics.edge import EdgeBoundaryF
from mtl.metrics.normals import NormalsScores
from mtl.metrics.saliency import saliency_metric
from mtl.metrics.segmentation import SegmentationScores

log = logging.getLogger(__name__)


def segmentation_metrics(num_classes: int | None, miou: str = "present") -> dict[str, Metric]:
    """mIoU (mean over the classes "present" in target or prediction, or over "all"), pixel
    accuracy and per-class IoU (semseg, parts)."""
    if num_classes is None:
        raise ValueError("segmentation metrics need a class count")
    return {"seg": SegmentationScores(num_classes, miou=miou)}


def depth_metrics(num_classes: int | None = None) -> dict[str, Metric]:
    """RMSE, abs-rel, sq-rel, log-RMSE, δ<1.25 pooled over valid pixels."""
    return {"depth": DepthScores()}


def normals_metrics(num_classes: int | None = None) -> dict[str, Metric]:
    """Mean and median angle error, shares under 11.25°, 22.5°, 30°."""
    return {"normals": NormalsScores()}


def saliency_metrics(num_classes: int | None = None, maxf: str = "A") -> dict[str, Metric]:
    """maxF and IoU in definition ``maxf``: "A" (ATRC/InvPT) or "B" (MTI-Net/MTLoRA/M3ViT)."""
    return {"sal": saliency_metric(maxf)}


def edge_metrics(
    num_classes: int | None = None,
    max_dist: float = 0.0075,
    thresholds: int | str | Sequence[float] = 99,
    thin: bool = True,
    nms: bool = False,
    every_n_epochs: int = 0,
    workers: int | None = None,
    online_thresholds: int = 0,
) -> dict[str, Metric]:
    """odsF, oisF, AP with the benchmark's matching (needs ``pyedgeeval``; else none: the online
    loss proxy ``<stage>/edge/loss`` remains)."""
    if not pyedgeeval_available():
        log.warning(
            "edge odsF/oisF/AP need the optional package pyedgeeval (pip install -e '.[edge]'); "
            "only the loss proxy is reported"
        )
        return {}
    return {
        "boundary": EdgeBoundaryF(
            max_dist=max_dist,
            thresholds=thresholds,
            thin=thin,
            nms=nms,
            every_n_epochs=every_n_epochs,
            workers=workers,
            online_thresholds=online_thresholds,
        )
    }
