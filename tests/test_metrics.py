"""Metrics against hand-computed values and plain NumPy references on random inputs."""

import math

import numpy as np
import pytest
import torch

from mtl.metrics.depth import DepthRMSE, DepthScores
from mtl.metrics.normals import (
    MEDIAN_BIN_WIDTH,
    NormalsMeanAngle,
    NormalsScores,
    angle_error_degrees,
)
from mtl.metrics.saliency import THRESHOLDS_A, THRESHOLDS_B, SaliencyDatasetF, SaliencyImageF
from mtl.metrics.segmentation import SegmentationScores


def _one_hot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def _logits(probabilities) -> torch.Tensor:
    p = torch.as_tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


# --------------------------------------------------------------------------- segmentation


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
    scores = metric.compute()
    assert scores["mIoU"].item() == 1.0
    assert torch.isnan(scores["per_class_iou"][2:]).all()  # empty classes: no IoU


def test_miou_over_all_classes_counts_absent_classes_as_zero():
    # confusion (rows target, columns prediction) of 4 classes, classes 2 and 3 absent from both:
    # class 0: TP 2, FP 1, FN 0 -> 2/3; class 1: TP 1, FP 0, FN 1 -> 1/2
    preds, target = torch.tensor([[[0, 0, 1, 0]]]), torch.tensor([[[0, 0, 1, 1]]])
    scores = {}
    for convention in ("present", "all"):
        metric = SegmentationScores(num_classes=4, miou=convention)
        metric.update(_one_hot_logits(preds, 4), target)
        scores[convention] = metric.compute()["mIoU"].item()
    assert math.isclose(scores["present"], (2 / 3 + 1 / 2) / 2, rel_tol=1e-6)
    assert math.isclose(scores["all"], (2 / 3 + 1 / 2 + 0 + 0) / 4, rel_tol=1e-6)
    with pytest.raises(ValueError, match="miou"):
        SegmentationScores(num_classes=4, miou="some")


def test_miou_convention_is_chosen_by_the_task_option():
    from mtl.metrics.collection import TaskMetrics

    metrics = TaskMetrics(
        ["semseg", "parts"], {"semseg": 3}, options={"semseg": {"miou": "all"}, "parts": {}}
    )
    preds = {"semseg": _one_hot_logits(torch.tensor([[[0, 1]]]), 3)}
    preds["parts"] = _one_hot_logits(torch.tensor([[[0, 1]]]), 7)
    metrics.update(preds, {"semseg": torch.tensor([[[0, 1]]]), "parts": torch.tensor([[[0, 1]]])})
    scores = metrics.compute()
    assert math.isclose(scores["semseg/mIoU"].item(), 2 / 3, rel_tol=1e-6)  # class 2: IoU 0
    assert scores["parts/mIoU"].item() == 1.0  # default: present classes only


def test_all_ignore_image_changes_nothing():
    logits = _one_hot_logits(torch.tensor([[[0, 1, 1]]]), 2)
    with_empty, without = SegmentationScores(2), SegmentationScores(2)
    for metric in (with_empty, without):
        metric.update(logits, torch.tensor([[[0, 1, 0]]]))
    with_empty.update(logits, torch.full((1, 1, 3), 255))
    assert torch.equal(with_empty.confmat, without.confmat)


def test_segmentation_matches_numpy_reference():
    rng = np.random.default_rng(0)
    metric, c = SegmentationScores(5), 5
    tp, fp, fn, correct, valid_total = np.zeros(c), np.zeros(c), np.zeros(c), 0, 0
    for _ in range(3):
        logits = rng.normal(size=(2, c, 6, 7)).astype(np.float32)
        target = rng.integers(0, c, size=(2, 6, 7))
        target[rng.random(target.shape) < 0.2] = 255
        metric.update(torch.from_numpy(logits), torch.from_numpy(target))
        pred, valid = logits.argmax(1), target != 255
        for k in range(c):
            tp[k] += np.sum((pred == k) & (target == k) & valid)
            fp[k] += np.sum((pred == k) & (target != k) & valid)
            fn[k] += np.sum((pred != k) & (target == k) & valid)
        correct += np.sum((pred == target) & valid)
        valid_total += valid.sum()
    scores = metric.compute()
    iou = tp / (tp + fp + fn)
    np.testing.assert_allclose(scores["per_class_iou"].numpy(), iou, rtol=1e-6)
    assert math.isclose(scores["mIoU"].item(), iou.mean(), rel_tol=1e-6)
    assert math.isclose(scores["pixel_acc"].item(), correct / valid_total, rel_tol=1e-6)


# --------------------------------------------------------------------------- depth


def test_depth_scores_pooled_over_valid_pixels_of_all_batches():
    metric = DepthScores()
    metric.update(torch.tensor([[1.0, 9.0]]), torch.tensor([[2.0, 0.0]]))  # one valid pixel
    metric.update(torch.tensor([[-3.0, 4.0, 5.0]]), torch.tensor([[1.0, 1.0, 5.0]]))  # -3 -> 0
    metric.update(torch.tensor([[7.0, 7.0]]), torch.tensor([[0.0, 0.0]]))  # all invalid
    scores = metric.compute()
    pred, true = np.array([1.0, 1e-9, 4.0, 5.0]), np.array([2.0, 1.0, 1.0, 5.0])
    clamped = np.array([1.0, 0.0, 4.0, 5.0])
    assert math.isclose(scores["rmse"].item(), math.sqrt((1 + 1 + 9 + 0) / 4), rel_tol=1e-6)
    abs_rel = np.mean(np.abs(clamped - true) / true)  # (0.5 + 1 + 3 + 0) / 4
    assert math.isclose(scores["abs_rel"].item(), abs_rel, rel_tol=1e-6)
    log_rmse = np.sqrt(np.mean((np.log(pred) - np.log(true)) ** 2))
    assert math.isclose(scores["log_rmse"].item(), log_rmse, rel_tol=1e-5)
    assert math.isclose(scores["delta1"].item(), 1 / 4)  # only the exact pixel 5 vs 5
    sq_rel = (1**2 / 2 + 1**2 / 1 + 3**2 / 1 + 0) / 4  # (p - g)^2 / g over the valid pixels
    assert math.isclose(scores["sq_rel"].item(), sq_rel, rel_tol=1e-6)


def test_depth_matches_numpy_reference():
    rng = np.random.default_rng(1)
    metric, preds, trues = DepthScores(), [], []
    for _ in range(3):
        pred = rng.uniform(-0.5, 6, size=(2, 1, 5, 8)).astype(np.float32)
        true = rng.uniform(0.5, 6, size=pred.shape).astype(np.float32)
        true[rng.random(true.shape) < 0.3] = 0
        metric.update(torch.from_numpy(pred), torch.from_numpy(true))
        preds.append(pred[true > 0].astype(np.float64))
        trues.append(true[true > 0].astype(np.float64))
    p, g = np.maximum(np.concatenate(preds), 0), np.concatenate(trues)
    floored = np.maximum(p, 1e-9)
    scores = metric.compute()
    assert math.isclose(scores["rmse"].item(), np.sqrt(np.mean((p - g) ** 2)), rel_tol=1e-5)
    assert math.isclose(scores["abs_rel"].item(), np.mean(np.abs(p - g) / g), rel_tol=1e-5)
    assert math.isclose(scores["sq_rel"].item(), np.mean((p - g) ** 2 / g), rel_tol=1e-5)
    log_rmse = np.sqrt(np.mean((np.log(floored) - np.log(g)) ** 2))
    assert math.isclose(scores["log_rmse"].item(), log_rmse, rel_tol=1e-5)
    delta1 = np.mean(np.maximum(floored / g, g / floored) < 1.25)
    assert math.isclose(scores["delta1"].item(), delta1, rel_tol=1e-6)


# --------------------------------------------------------------------------- normals


def test_angle_error_is_exact_for_known_angles():
    pred = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    assert torch.allclose(
        angle_error_degrees(pred, target), torch.tensor([[[0.0, 45.0, 180.0]]]), atol=1e-4
    )


def test_normals_scores_by_hand_skipping_zero_targets():
    metric = NormalsScores()
    x, y, z = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    tilt = [math.sin(math.radians(20)), 0.0, math.cos(math.radians(20))]
    pred = torch.tensor([z, z, tilt, z]).T.reshape(1, 3, 1, 4)
    target = torch.tensor([y, z, z, [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 4)  # 90°, 0°, 20°, -
    metric.update(pred, target)
    metric.update(pred[..., :1], torch.zeros(1, 3, 1, 1))  # an all-invalid image
    metric.update(torch.tensor(x).reshape(1, 3, 1, 1), torch.tensor(x).reshape(1, 3, 1, 1))  # 0°
    scores = metric.compute()  # errors: 90, 0, 20, 0
    assert math.isclose(scores["mean_angle"].item(), 110 / 4, rel_tol=1e-5)
    assert scores["within_11.25"].item() == 0.5
    assert scores["within_22.5"].item() == 0.75
    assert scores["within_30"].item() == 0.75
    # sorted errors 0, 0, 20, 90: the histogram gives the value at rank n/2 within one bin
    assert abs(scores["median_angle"].item() - 0.0) <= MEDIAN_BIN_WIDTH


def test_normals_matches_numpy_reference():
    rng = np.random.default_rng(2)
    metric, angles = NormalsScores(), []
    for _ in range(3):
        pred = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
        true = pred + rng.normal(scale=0.4, size=pred.shape).astype(np.float32)
        true /= np.linalg.norm(true, axis=1, keepdims=True)
        true[:, :, :3] = 0  # invalid rows
        metric.update(torch.from_numpy(pred), torch.from_numpy(true))
        p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
        cos = np.clip(np.sum(p * true, axis=1), -1, 1)
        angles.append(np.degrees(np.arccos(cos))[np.abs(true).sum(1) > 0])
    errors = np.concatenate(angles)
    scores = metric.compute()
    assert math.isclose(scores["mean_angle"].item(), errors.mean(), rel_tol=1e-4)
    assert abs(scores["median_angle"].item() - np.median(errors)) < 2 * MEDIAN_BIN_WIDTH
    for threshold in (11.25, 22.5, 30):
        expected = np.mean(errors < threshold)
        assert math.isclose(scores[f"within_{threshold:g}"].item(), expected, abs_tol=1e-6)


# --------------------------------------------------------------------------- saliency


def test_saliency_a_by_hand_with_ignore_pixels():
    metric = SaliencyDatasetF()
    # probabilities 0.92, 0.62, 0.33, 0.02 (ignored); targets 1, 0, 1, 255
    metric.update(
        _logits([0.92, 0.62, 0.33, 0.02]).reshape(1, 1, 1, 4),
        torch.tensor([1.0, 0.0, 1.0, 255.0]).reshape(1, 1, 1, 4),
    )
    scores = metric.compute()
    # t <= 0.33: P 2/3 R 1 -> F 0.7222; t in (0.33, 0.62]: P 1/2 R 1/2 -> F 0.5;
    # t in (0.62, 0.92]: P 1 R 1/2 -> F = 1.3 * 0.5 / (0.3 + 0.5) = 0.8125
    assert math.isclose(scores["maxF"].item(), 0.8125, rel_tol=1e-6)
    assert math.isclose(scores["mIoU"].item(), 2 / 3, rel_tol=1e-6)  # t <= 0.33: 2 / (3+2-2)


def _two_definitions_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 1x4 images: a good one, a wrong one, an empty one (no salient pixel, none found)."""
    probs = [[0.99, 0.99, 0.99, 0.99], [0.01, 0.99, 0.01, 0.01], [0.01, 0.01, 0.01, 0.01]]
    target = [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    return _logits(probs).reshape(3, 1, 1, 4), torch.tensor(target).reshape(3, 1, 1, 4)


def test_saliency_definitions_differ_on_a_crafted_case():
    preds, target = _two_definitions_case()
    a, b = SaliencyDatasetF(), SaliencyImageF()
    a.update(preds, target)
    b.update(preds, target)
    scores_a, scores_b = a.compute(), b.compute()
    # A: TP 3, predicted 5, actual 4 -> P 0.6, R 0.75, F(β²=0.3) = 0.585 / 0.93; IoU 3/6
    assert math.isclose(scores_a["maxF"].item(), 0.585 / 0.93, rel_tol=1e-6)
    assert math.isclose(scores_a["mIoU"].item(), 0.5, rel_tol=1e-6)
    # B: per image P (0.75, 0, 0), R (1, 0, 0), J (0.75, 0, 1 for the empty image)
    precision, recall = 0.25, 1 / 3
    expected_f = 2 * precision * recall / (precision + recall)
    assert math.isclose(scores_b["maxF"].item(), expected_f, rel_tol=1e-6)
    assert math.isclose(scores_b["mIoU"].item(), 1.75 / 3, rel_tol=1e-6)
    assert abs(scores_a["maxF"].item() - scores_b["maxF"].item()) > 0.2


def _numpy_saliency(probs: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Both definitions written as loops over images and thresholds."""
    valid, positive = target != 255, target == 1
    f_a, iou_a = [], []
    for t in THRESHOLDS_A:
        predicted = (probs >= t) & valid
        tp, n_pred, n_true = np.sum(predicted & positive), predicted.sum(), np.sum(positive & valid)
        p, r = tp / max(n_pred, 1), tp / max(n_true, 1)
        f_a.append(1.3 * p * r / (0.3 * p + r) if 0.3 * p + r > 0 else 0.0)
        iou_a.append(tp / (n_pred + n_true - tp) if n_pred + n_true - tp > 0 else 0.0)
    f_b, iou_b = [], []
    for t in THRESHOLDS_B:
        ps, rs, js = [], [], []
        for i in range(probs.shape[0]):
            pred_i = (probs[i] > t) & valid[i]
            true_i = positive[i] & valid[i]
            tp = np.sum(pred_i & true_i)
            ps.append(tp / (pred_i.sum() + 1e-12))
            rs.append(tp / (true_i.sum() + 1e-12))
            union = np.sum(pred_i | true_i)
            js.append(1.0 if union == 0 else tp / union)
        p, r = np.mean(ps), np.mean(rs)
        f_b.append(2 * p * r / (p + r + 1e-12))
        iou_b.append(np.mean(js))
    return {"A": max(f_a), "A_iou": max(iou_a), "B": max(f_b), "B_iou": max(iou_b)}


def test_saliency_matches_numpy_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 1, 9, 9)).astype(np.float32)
    target = (rng.random((6, 1, 9, 9)) < 0.4).astype(np.float32)
    target[rng.random(target.shape) < 0.1] = 255
    a, b = SaliencyDatasetF(), SaliencyImageF()
    for start in (0, 3):  # two batches
        batch = slice(start, start + 3)
        a.update(torch.from_numpy(logits[batch]), torch.from_numpy(target[batch]))
        b.update(torch.from_numpy(logits[batch]), torch.from_numpy(target[batch]))
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    expected = _numpy_saliency(probs, target)
    assert math.isclose(a.compute()["maxF"].item(), expected["A"], rel_tol=1e-5)
    assert math.isclose(a.compute()["mIoU"].item(), expected["A_iou"], rel_tol=1e-5)
    assert math.isclose(b.compute()["maxF"].item(), expected["B"], rel_tol=1e-5)
    assert math.isclose(b.compute()["mIoU"].item(), expected["B_iou"], rel_tol=1e-5)


def test_saliency_definition_is_chosen_by_option():
    from mtl.metrics.factories import saliency_metrics

    assert isinstance(saliency_metrics(None)["sal"], SaliencyDatasetF)
    assert isinstance(saliency_metrics(None, maxf="B")["sal"], SaliencyImageF)
    with pytest.raises(ValueError, match="expected 'A' or 'B'"):
        saliency_metrics(None, maxf="C")


def test_single_score_variants_return_scalars():
    rmse, angle = DepthRMSE(), NormalsMeanAngle()
    rmse.update(torch.tensor([[1.0, 9.0]]), torch.tensor([[2.0, 0.0]]))
    normal = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    angle.update(normal, torch.tensor([0.0, 1.0, 0.0]).reshape(1, 3, 1, 1))
    assert rmse.compute().item() == pytest.approx(1.0)
    assert angle.compute().item() == pytest.approx(90.0)
