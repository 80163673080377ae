"""Δm against hand-computed values: signs from the registry's metric directions."""

import math

import pytest
import torch

from mtl.metrics.collection import TaskMetrics
from mtl.metrics.delta_m import delta_m, find_baselines, load_baselines, task_gains

BASELINES = {"semseg": {"mIoU": 0.5}, "depth": {"rmse": 0.5}, "normals": {"mean_angle": 20.0}}


def test_signs_follow_the_direction_of_each_main_metric():
    # semseg mIoU up 10% (better: +10), depth RMSE up 20% (worse: -20), normals error down 25%
    # (better: +25)
    scores = {"val/semseg/mIoU": 0.55, "val/depth/rmse": 0.6, "val/normals/mean_angle": 15.0}
    gains = task_gains(scores, BASELINES, ["semseg", "depth", "normals"], prefix="val/")
    assert gains == pytest.approx({"semseg": 10.0, "depth": -20.0, "normals": 25.0})
    value = delta_m(scores, BASELINES, ["semseg", "depth", "normals"], prefix="val/")
    assert math.isclose(value, 5.0, rel_tol=1e-9)


def test_equal_to_the_baselines_is_zero_and_a_missing_main_metric_gives_none():
    scores = {"semseg/mIoU": 0.5, "depth/rmse": 0.5}
    assert delta_m(scores, BASELINES, ["semseg", "depth"]) == 0.0
    assert delta_m({"semseg/mIoU": 0.5}, BASELINES, ["semseg", "depth"]) is None
    assert delta_m(scores, {"semseg": {"mIoU": 0.5}}, ["semseg", "depth"]) is None


def test_task_metrics_adds_delta_m_when_baselines_are_given():
    metrics = TaskMetrics(["semseg", "depth"], {"semseg": 2}, baselines=BASELINES)
    logits = torch.tensor([[[[5.0, -5.0]], [[-5.0, 5.0]]]])  # predicts classes 0, 1
    metrics.update(
        {"semseg": logits, "depth": torch.tensor([[[[0.6, 0.6]]]])},
        {"semseg": torch.tensor([[[0, 0]]]), "depth": torch.tensor([[[[1.0, 1.0]]]])},
    )
    scores = metrics.compute()
    # mIoU = (1/2 + 0/1) / 2 = 0.25 -> -50%; RMSE 0.4 -> +20%; Δm = -15
    assert scores["delta/semseg"].item() == pytest.approx(-50.0)
    assert scores["delta/depth"].item() == pytest.approx(20.0)
    assert scores["delta_m"].item() == pytest.approx(-15.0)


def test_baselines_files_by_name_and_path(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("# header\nsemseg: {mIoU: 0.5, pixel_acc: 0.9}\ndepth:\n  rmse: 0.5\n")
    assert load_baselines(find_baselines(path)) == {
        "semseg": {"mIoU": 0.5, "pixel_acc": 0.9},
        "depth": {"rmse": 0.5},
    }
    assert find_baselines("synthetic").name == "synthetic.yaml"
    with pytest.raises(FileNotFoundError, match="known"):
        find_baselines("no_such_baselines")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="task -> "):
        load_baselines(path)
