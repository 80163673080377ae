"""Δm against hand-computed values: signs from the registry's metric directions."""

import json
import math

import pytest
import torch

from mtl.config import ConfigError, validate_config
from mtl.metrics.collection import TaskMetrics
from mtl.metrics.delta_m import delta_m, find_baselines, load_baselines, task_gains
from mtl.train import train

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


def test_a_training_run_with_edge_writes_delta_m_at_the_default_edge_schedule(make_cfg, tmp_path):
    """Edge odsF is off during the fit (every_n_epochs: 0), yet the final evaluation computes it,
    so Δm exists in metrics.json."""
    baselines = tmp_path / "baselines.yaml"
    baselines.write_text("semseg: {mIoU: 0.5}\nedge: {odsF: 0.5}\n")
    cfg = make_cfg(
        "data.tasks=[semseg,edge]", "trainer.max_epochs=1", f"delta_m_baselines={baselines}"
    )
    assert cfg.data.metric_options.edge.get("every_n_epochs", 0) == 0
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["val/edge/odsF"] <= 1
    gains = [(metrics[k] - 0.5) / 0.5 * 100 for k in ("val/semseg/mIoU", "val/edge/odsF")]
    assert metrics["val/delta_m"] == pytest.approx(sum(gains) / 2, rel=1e-5)


def test_optimizing_delta_m_without_baselines_is_refused_before_training(make_cfg):
    with pytest.raises(ConfigError, match="delta_m_baselines") as error:
        validate_config(make_cfg("optimized_metric=val/delta_m"))
    assert "optimized_metric" in str(error.value)
    validate_config(make_cfg("optimized_metric=val/delta_m", "delta_m_baselines=synthetic"))


def test_a_baselines_file_without_a_trained_tasks_main_metric_is_refused(make_cfg, tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("semseg: {mIoU: 0.5}\nedge: {loss: 0.1}\n")
    with pytest.raises(ConfigError) as error:
        validate_config(make_cfg("data.tasks=[semseg,edge]", f"delta_m_baselines={path}"))
    message = str(error.value)
    assert str(path) in message and "edge" in message and "odsF" in message
    validate_config(make_cfg("data.tasks=[semseg]", f"delta_m_baselines={path}"))
    with pytest.raises(ConfigError, match="no_such_baselines"):
        validate_config(make_cfg("delta_m_baselines=no_such_baselines"))
