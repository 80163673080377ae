"""The task registry: the single place where a dense-prediction task is defined.

A task entry says how many channels its head predicts, its loss and default loss weight, how a
raw prediction is decoded, how its target is resized and flipped, which metrics score it
(with each metric's direction, which the multi-task gain needs) and what kind of map it predicts
(how pictures show it and how exported files store it).

A *training-only* task (``training_only=True``, e.g. ``sem_boundary``) has a loss, a loss weight
and a balancer weight but no scores: runs list it in ``data.aux_tasks``, never in ``data.tasks``,
its targets are computed from another task's (``derived_from``) after augmentation, its head is
an auxiliary one (``aux_head``) that inference models drop, and it appears in no report (Δm,
metric tables, validation/test logs, exported predictions, images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mtl import losses
from mtl.data.boundaries import boundary_targets
from mtl.metrics.factories import (
    depth_metrics,
    edge_metrics,
    normals_metrics,
    saliency_metrics,
    segmentation_metrics,
)

#: Kinds of decoded maps, which say how a task is drawn (W&B, TensorBoard, export pictures) and
#: stored (prediction export):
#: labels: class indices; coloured masks; uint8 PNG of the index.
#: scalar: non-negative values (depth, metres); a colour map from 0 to the largest valid target
#:   value with a colour bar; uint16 PNG of value x 1000 (millimetres) or float32 .npy.
#: vector: unit vectors (normals); (n + 1) / 2 as RGB; uint8 RGB PNG of (n + 1) x 255 / 2.
#: probability: values in [0, 1] (edge, saliency); a colour map on [0, 1]; uint8 PNG of value x 255.
#: raw: anything else; a colour map from its smallest to its largest value; float32 .npy.
KINDS = ("labels", "scalar", "vector", "probability", "raw")


@dataclass(frozen=True)
class Task:
    """Everything the framework needs to know about one task."""

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    loss_weight: float
    decode: Callable[[Tensor], Tensor]
    metrics: Callable[..., Mapping[str, Metric]]  # factory(num_classes, **options)
    higher_is_better: Mapping[str, bool]
    main_metric: str
    out_channels: int | None = None  # None: number of classes, given by the dataset
    classification: bool = False  # target is a map of class indices (int64 [H,W])
    flip_negates_channel: int | None = None  # channel whose sign a horizontal flip changes
    ignore_value: float = 255  # target value of invalid pixels, also used for padding
    kind: str = "raw"  # what the decoded prediction is: one of KINDS
    training_only: bool = False  # a loss and balancer weight, no scores (see the module doc)
    # the task whose (augmented) target this task's target is computed from, with `derive`
    # (source target, class count) -> target; its class count is this task's
    derived_from: str | None = None
    derive: Callable[[Tensor, int], Tensor] | None = None
    # the auxiliary head's class (dotted path, as a Hydra ``_target_``) of a training-only
    # task; called as ``head(in_channels=, in_strides=, out_channels=)``
    aux_head: str | None = None

    def channels(self, num_classes: Mapping[str, int]) -> int:
        """Output channels of this task's head, taking class counts from the dataset."""
        if self.out_channels is not None:
            return self.out_channels
        name = self.derived_from or self.name
        if name not in num_classes:
            raise ValueError(f"task '{self.name}' needs data.num_classes.{name} to be set")
        return int(num_classes[name])


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry (names are unique)."""
    if task.name in TASKS:
        raise ValueError(f"task '{task.name}' is registered twice")
    if task.kind not in KINDS or task.classification != (task.kind == "labels"):
        raise ValueError(
            f"task '{task.name}': kind '{task.kind}'; expected one of {KINDS}, 'labels' exactly "
            "for classification tasks"
        )
    if task.training_only and (task.higher_is_better or task.aux_head is None):
        raise ValueError(
            f"task '{task.name}': a training-only task has no scores and needs an aux_head"
        )
    TASKS[task.name] = task
    return task


def training_only(name: str) -> bool:
    """Whether `name` is a registered training-only task (no scores, in no report)."""
    return name in TASKS and TASKS[name].training_only


def reported(tasks: Iterable[str]) -> list[str]:
    """`tasks` without the training-only ones: the tasks a report (scores, Δm, tables,
    exported predictions, images) covers."""
    return [t for t in tasks if not training_only(t)]


def get_task(name: str) -> Task:
    """Look a task up by name, with the known names in the error."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task '{name}'; known tasks: {sorted(TASKS)}") from None


register(
    Task(
        name="semseg",
        loss=losses.cross_entropy,
        loss_weight=1.0,
        decode=lambda pred: pred.argmax(dim=1),
        metrics=segmentation_metrics,
        higher_is_better={"mIoU": True, "pixel_acc": True},
        main_metric="mIoU",
        classification=True,
        kind="labels",
    )
)
register(
    Task(
        name="depth",
        out_channels=1,
        loss=losses.depth_l1,
        loss_weight=1.0,
        decode=lambda pred: pred.clamp_min(0),
        metrics=depth_metrics,
        higher_is_better={
            "rmse": False,
            "abs_rel": False,
            "sq_rel": False,
            "log_rmse": False,
            "delta1": True,
        },
        main_metric="rmse",
        ignore_value=0,
        kind="scalar",
    )
)
register(
    Task(
        name="normals",
        out_channels=3,
        loss=losses.normals_l1,
        loss_weight=10.0,
        decode=lambda pred: F.normalize(pred, dim=1),
        metrics=normals_metrics,
        higher_is_better={
            "mean_angle": False,
            "median_angle": False,
            "within_11.25": True,
            "within_22.5": True,
            "within_30": True,
        },
        main_metric="mean_angle",
        flip_negates_channel=0,
        ignore_value=0,
        kind="vector",
    )
)
register(
    Task(
        name="edge",
        out_channels=1,
        loss=losses.edge_bce,
        loss_weight=50.0,
        decode=torch.sigmoid,
        metrics=edge_metrics,  # the loss is the online proxy; odsF needs pyedgeeval
        higher_is_better={"odsF": True, "oisF": True, "ap": True, "loss": False},
        main_metric="odsF",
        kind="probability",
    )
)
register(
    Task(
        name="sal",
        out_channels=1,
        loss=losses.balanced_bce,
        loss_weight=5.0,
        decode=torch.sigmoid,
        metrics=saliency_metrics,
        higher_is_better={"maxF": True, "mIoU": True, "loss": False},
        main_metric="maxF",
        kind="probability",
    )
)
register(
    Task(
        name="parts",
        out_channels=7,  # background + head, torso, upper arm, lower arm, upper leg, lower leg
        loss=losses.cross_entropy,
        loss_weight=2.0,
        decode=lambda pred: pred.argmax(dim=1),
        metrics=lambda _, **options: segmentation_metrics(7, **options),
        higher_is_better={"mIoU": True, "pixel_acc": True},
        main_metric="mIoU",
        classification=True,
        kind="labels",
    )
)
register(
    Task(
        name="sem_boundary",  # SBCB (Ishikawa & Aoki, Sensors 2023): K-class semantic boundaries
        loss=losses.multilabel_edge_bce,  # on the fused and the last side output
        loss_weight=5.0,
        decode=lambda pred: torch.sigmoid(pred[:, : pred.shape[1] // 2]),  # the fused map
        metrics=lambda _, **options: {},
        higher_is_better={},
        main_metric="",
        training_only=True,
        derived_from="semseg",
        derive=boundary_targets,
        aux_head="mtl.models.aux_heads.CASENetHead",
    )
)
