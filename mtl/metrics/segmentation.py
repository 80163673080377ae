"""Semantic segmentation scores from a dataset-level confusion matrix."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255
#: mean IoU over the classes present in target or prediction, or over all classes
MIOU_CONVENTIONS = ("present", "all")


class SegmentationScores(MulticlassConfusionMatrix):
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix (ignore label 255).

    IoU_c = TP / (TP + FP + FN) over all valid pixels of the dataset. ``miou`` chooses the mean:
    "present" (default) runs over the classes that occur in the ground truth or the prediction
    (a class absent from both has no defined IoU); "all" runs over every class, counting an
    absent class as 0, as the MTI-Net/ATRC/InvPT evaluation code does (the two agree when every
    class occurs, as on the full benchmark splits). torchmetrics gives the confusion matrix; the
    derived scores are a few lines.
    """

    def __init__(self, num_classes: int, miou: str = "present", **kwargs) -> None:
        if miou not in MIOU_CONVENTIONS:
            raise ValueError(f"miou: '{miou}'; expected one of {list(MIOU_CONVENTIONS)}")
        super().__init__(num_classes=num_classes, ignore_index=IGNORE_INDEX, **kwargs)
        self.miou = miou

    def update(self, preds: Tensor, target: Tensor) -> None:  # preds: logits [B,C,H,W]
        super().update(preds.argmax(dim=1), target)

    def compute(self) -> dict[str, Tensor]:
        confusion = self.confmat.double()  # rows: target, columns: prediction
        true_positive = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        iou = true_positive / union
        mean = iou.nanmean() if self.miou == "present" else iou.nan_to_num(0.0).mean()
        return {
            "mIoU": mean.float(),
            "pixel_acc": (true_positive.sum() / confusion.sum()).float(),
            "per_class_iou": iou.float(),
        }
