"""Semantic segmentation scores from a dataset-level confusion matrix."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255


class SegmentationScores(MulticlassConfusionMatrix):
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix (ignore label 255).

    IoU_c = TP / (TP + FP + FN) over all valid pixels of the dataset; the mean runs over the
    classes that occur in the ground truth or the prediction (a class absent from both has no
    defined IoU). torchmetrics gives the confusion matrix; the derived scores are three lines.
    """

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes=num_classes, ignore_index=IGNORE_INDEX, **kwargs)

    def update(self, preds: Tensor, target: Tensor) -> None:  # preds: logits [B,C,H,W]
        super().update(preds.argmax(dim=1), target)

    def compute(self) -> dict[str, Tensor]:
        confusion = self.confmat.double()  # rows: target, columns: prediction
        true_positive = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        iou = true_positive / union
        return {
            "mIoU": iou.nanmean().float(),
            "pixel_acc": (true_positive.sum() / confusion.sum()).float(),
            "per_class_iou": iou.float(),
        }
