"""The evaluation entry point on a tiny trained checkpoint, and the prediction export."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mtl.export import PredictionWriter
from mtl.metrics.boundary import pyedgeeval_available
from mtl.tasks import get_task
from mtl.train import train

TASKS = ["semseg", "depth", "normals", "edge", "sal"]
SCORES = {  # scores every evaluation reports (edge odsF/oisF/AP need pyedgeeval)
    "semseg": ["mIoU", "pixel_acc", "loss"],
    "depth": ["rmse", "abs_rel", "log_rmse", "delta1", "loss"],
    "normals": ["mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"],
    "edge": ["loss", *(["odsF", "oisF", "ap"] if pyedgeeval_available() else [])],
    "sal": ["maxF", "mIoU", "loss"],
}


@pytest.fixture
def checkpoint(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1", output_dir=tmp_path / "fit"))
    return tmp_path / "fit" / "checkpoints" / "last.ckpt"


def test_evaluating_a_checkpoint_writes_every_file(make_cfg, tmp_path, checkpoint):
    baselines = tmp_path / "baselines.yaml"
    baselines.write_text(yaml.safe_dump({t: {get_task(t).main_metric: 0.5} for t in TASKS}))
    out = tmp_path / "eval"
    cfg = make_cfg(
        "train=false",
        f"ckpt_path={checkpoint}",
        "save_predictions=true",
        f"delta_m_baselines={baselines}",
        "++data.metric_options.edge.workers=0",
        output_dir=out,
    )
    scores = train(cfg)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == pytest.approx(scores)
    assert not any(key.startswith("val/") for key in metrics)
    for task, names in SCORES.items():
        for name in names:
            assert isinstance(metrics[f"test/{task}/{name}"], float), f"test/{task}/{name}"
    assert ("test/delta_m" in metrics) == pyedgeeval_available()  # edge's main metric is odsF
    assert "test/delta/semseg" in metrics

    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    names = list(cfg.data.class_names.semseg)
    assert [r["class"] for r in rows] == names
    assert {r["key"] for r in rows} == {"test/semseg/per_class_iou"}
    assert list(json.loads((out / "per_class.json").read_text())["test/semseg/per_class_iou"]) == (
        names
    )

    predictions = out / "predictions"
    ids = (predictions / "ids.txt").read_text().split()
    assert len(ids) == cfg.data.generate.n_val
    height, width = cfg.data.image_size
    for task in TASKS:
        files = sorted(p.stem for p in (predictions / task).glob("*.png"))
        assert files == sorted(ids), task
        array = np.asarray(Image.open(predictions / task / f"{ids[0]}.png"))
        assert array.shape[:2] == (height, width), task
    assert np.asarray(Image.open(predictions / "depth" / f"{ids[0]}.png")).dtype == np.uint16
    assert np.asarray(Image.open(predictions / "normals" / f"{ids[0]}.png")).shape[2] == 3
    assert len((predictions / "seism_parameters.txt").read_text().split()) == 99
    assert len(list((predictions / "visual").glob("*.png"))) == len(ids)


def test_evaluation_needs_a_checkpoint(make_cfg):
    with pytest.raises(ValueError, match="ckpt_path"):
        train(make_cfg("train=false"))


def test_export_crops_padding_and_encodes_each_task(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch_size, height, width, bottom, right = 2, 10, 12, 2, 3
    preds = {
        "semseg": torch.randn(batch_size, 5, height, width, generator=g),
        "depth": torch.rand(batch_size, 1, height, width, generator=g) * 5,
        "normals": torch.randn(batch_size, 3, height, width, generator=g),
        "sal": torch.randn(batch_size, 1, height, width, generator=g),
        "edge": torch.randn(batch_size, 1, height, width, generator=g),
    }
    batch = {
        "image": torch.randn(batch_size, 3, height, width, generator=g),
        "semseg": torch.randint(0, 5, (batch_size, height, width), generator=g),
        "meta": {
            "id": ["a", "b"],
            "pad": [
                torch.zeros(2),
                torch.full((2,), bottom),
                torch.zeros(2),
                torch.full((2,), right),
            ],
        },
    }
    writer = PredictionWriter(tmp_path, max_visuals=1)
    writer.write_batch(preds, batch)
    writer.write_lists()

    h, w = height - bottom, width - right
    semseg = np.asarray(Image.open(tmp_path / "semseg" / "b.png"))
    assert semseg.shape == (h, w)
    assert np.array_equal(semseg, preds["semseg"][1, :, :h, :w].argmax(0).numpy())
    depth = np.asarray(Image.open(tmp_path / "depth" / "a.png"))
    assert depth.dtype == np.uint16
    assert np.allclose(depth / 1000, preds["depth"][0, 0, :h, :w].numpy(), atol=5e-4)
    normals = 2 * np.asarray(Image.open(tmp_path / "normals" / "a.png"), dtype=float) / 255 - 1
    expected = torch.nn.functional.normalize(preds["normals"][0], dim=0)[:, :h, :w]
    assert np.allclose(normals, expected.permute(1, 2, 0).numpy(), atol=1 / 255)
    for task in ("sal", "edge"):
        probability = torch.sigmoid(preds[task][1, 0, :h, :w]).numpy()
        stored = np.asarray(Image.open(tmp_path / task / "b.png"))
        assert np.array_equal(stored, (probability * 255).astype(np.uint8)), task
    assert (tmp_path / "ids.txt").read_text() == "a\nb\n"
    assert [p.name for p in (tmp_path / "visual").iterdir()] == ["a.png"]
    picture = Image.open(tmp_path / "visual" / "a.png")
    assert picture.width > 3 * w and picture.height > len(preds) * h


def test_eval_script_adds_the_evaluation_overrides():
    path = Path(__file__).resolve().parents[1] / "eval.py"
    spec = importlib.util.spec_from_file_location("eval_entry_point", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.with_evaluation_overrides(["ckpt_path=x.ckpt"]) == [
        "train=false",
        "task_name=eval",
        "ckpt_path=x.ckpt",
    ]
    assert module.with_evaluation_overrides(["task_name=mine"])[:2] == [
        "train=false",
        "task_name=mine",
    ]
