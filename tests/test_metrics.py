"""Metrics against hand-computed values, including accumulation over several batches."""

import math

import torch

from mtl.metrics.depth import DepthRMSE
from mtl.metrics.normals import NormalsMeanAngle, angle_error_degrees
from mtl.metrics.segmentation import SegmentationScores


def _one_hot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def test_miou_from_dataset_confusion_matrix():
    metric = SegmentationScores(num_classes=3)
    # batch 1: target [0 1; 2 255], prediction [0 1; 1 2]
    metric.update(
        _one_hot_logits(torch.tensor([[[0, 1], [1, 2]]]), 3), torch.tensor([[[0, 1], [2, 255]]])
    )
    # batch 2: target [2 2], prediction [2 0]
    metric.update(_one_hot_logits(torch.tensor([[[2, 0]]]), 3), torch.tensor([[[2, 2]]]))
    scores = metric.compute()
    # class 0: TP1 FP1 FN0 -> 1/2; class 1: TP1 FP1 FN0 -> 1/2; class 2: TP1 FP0 FN2 -> 1/3
    assert torch.allclose(scores["per_class_iou"], torch.tensor([0.5, 0.5, 1 / 3]))
    assert math.isclose(scores["mIoU"].item(), (0.5 + 0.5 + 1 / 3) / 3, rel_tol=1e-6)
    assert math.isclose(scores["pixel_acc"].item(), 3 / 5, rel_tol=1e-6)


def test_miou_skips_classes_absent_from_prediction_and_target():
    metric = SegmentationScores(num_classes=4)
    metric.update(_one_hot_logits(torch.tensor([[[0, 1]]]), 4), torch.tensor([[[0, 1]]]))
    assert metric.compute()["mIoU"].item() == 1.0


def test_depth_rmse_pooled_over_valid_pixels_of_all_batches():
    metric = DepthRMSE()
    metric.update(torch.tensor([[1.0, 9.0]]), torch.tensor([[2.0, 0.0]]))  # one valid pixel, err 1
    metric.update(
        torch.tensor([[-3.0, 4.0, 5.0]]), torch.tensor([[1.0, 1.0, 5.0]])
    )  # clamp: 1, 3, 0
    assert math.isclose(metric.compute().item(), math.sqrt((1 + 1 + 9 + 0) / 4), rel_tol=1e-6)


def test_angle_error_is_exact_for_known_angles():
    pred = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    assert torch.allclose(
        angle_error_degrees(pred, target), torch.tensor([[[0.0, 45.0, 180.0]]]), atol=1e-4
    )


def test_normals_mean_angle_skips_zero_targets():
    metric = NormalsMeanAngle()
    pred = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    metric.update(pred, target)
    assert math.isclose(metric.compute().item(), 90.0, rel_tol=1e-5)
