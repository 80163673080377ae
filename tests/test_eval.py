"""The evaluation entry point on a tiny trained checkpoint, and the prediction export."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from mtl.eval_config import evaluation_config
from mtl.export import PredictionWriter
from mtl.metrics.boundary import pyedgeeval_available
from mtl.redact import REDACTED
from mtl.tasks import get_task
from mtl.train import train

ROOT = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- the checkpoint's stored config
def run_script(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python <args>`` as a user runs it, from `cwd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "command", [["eval.py"], ["train.py", "train=false"]], ids=["eval.py", "train=false"]
)
def test_evaluation_builds_the_model_and_data_from_the_checkpoint(trained_run, tmp_path, command):
    """Trained with model/decoder=conv and tiny data; evaluated with nothing but the checkpoint
    (and a class-name override, which wins): the run's own final scores come back."""
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    script, *rest = command
    result = run_script(
        script, *rest, f"ckpt_path={checkpoint}", f"hydra.run.dir={out}",
        "data.class_names.semseg=[a,b,c,d,e]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    console = result.stdout + result.stderr
    assert "dirpath has changed" not in console  # no checkpoint saver restored into eval/
    assert "it/s" not in console  # output to a pipe: no progress bar frames

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["decoder"]["_target_"].endswith("ConvDecoder")
    assert config["model"]["decoder"]["hidden_channels"] == 16
    assert config["data"]["generate"]["n_train"] == 16 and config["data"]["image_size"] == [48, 64]

    scores = json.loads((out / "metrics.json").read_text())
    trained = json.loads((trained_run / "metrics.json").read_text())
    for key in ("semseg/mIoU", "semseg/pixel_acc", "depth/rmse", "normals/mean_angle", "sal/maxF"):
        assert scores[f"test/{key}"] == pytest.approx(trained[f"val/{key}"], rel=1e-5), key
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert scores["checkpoint/epoch"] == stored["epoch"] == 0
    assert scores["checkpoint/step"] == stored["global_step"] == 2

    with open(out / "per_class.csv") as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["a", "b", "c", "d", "e"]


def test_a_training_run_scores_its_last_checkpoint_and_names_it(trained_run, make_cfg):
    assert make_cfg().eval_ckpt == "last"
    scores = json.loads((trained_run / "metrics.json").read_text())
    last = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (scores["checkpoint/epoch"], scores["checkpoint/step"]) == (
        last["epoch"],
        last["global_step"],
    )
    assert isinstance(scores["checkpoint/step"], int) and scores["val/semseg/mIoU"] > 0


def test_a_model_option_replaces_the_stored_node_and_an_unfit_checkpoint_is_one_error(
    trained_run, tmp_path
):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    result = run_script(
        "eval.py", f"ckpt_path={checkpoint}", f"hydra.run.dir={out}", "model/decoder=hrnet"
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint {checkpoint} was written for another model:"]
    assert "decoder: checkpoint 'mtl.models.decoders.ConvDecoder', config " in result.stderr
    assert "drop model/decoder=hrnet: evaluation builds the model from the checkpoint's" in (
        result.stderr
    )
    assert not (out / "metrics.json").exists()


def test_resuming_a_checkpoint_of_another_model_is_one_error(trained_run, tiny_data_root, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    result = run_script(
        "train.py", f"ckpt_path={checkpoint}", "data.tasks=[semseg,depth]",
        "data.generate.n_train=16", "data.generate.n_val=8", "data.image_size=[48,64]",
        f"data.root={tiny_data_root}", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert f"error: checkpoint {checkpoint} was written for another model" in result.stderr
    assert "tasks: checkpoint ['semseg', 'depth', 'normals', 'edge', 'sal'], config " in (
        result.stderr
    )


def test_command_line_values_win_over_the_stored_config(make_cfg):
    stored = OmegaConf.to_container(
        make_cfg("model/decoder=conv", "model.decoder.hidden_channels=16",
                 "data.tasks=[semseg,depth]", "data.batch_size=8"),
        resolve=True,
    )  # fmt: skip
    stored["data"]["root"] = "/elsewhere/scenes"
    overrides = [
        "experiment=synthetic_vit_tiny_none_equal",  # a global group: the values it changes
        "data.batch_size=2",  # typed: wins
        "~data.metric_options",  # removed
        "model/adapter=lora",  # a group inside the model: the chosen node, whole
    ]
    cfg = make_cfg(*overrides)
    groups = ["data", "model", "model/backbone", "model/decoder", "model/adapter", "experiment"]
    merged = evaluation_config(
        cfg, stored, overrides, groups,
        compose=lambda given: make_cfg(*given),
    )  # fmt: skip
    assert list(merged.data.tasks) == ["semseg", "depth"]  # stored
    assert merged.data.root == "/elsewhere/scenes"  # stored
    assert merged.data.batch_size == 2  # typed
    assert "metric_options" not in merged.data
    assert merged.model.decoder.hidden_channels == 16  # stored, untouched by the options
    assert merged.model.backbone.name == "vit_tiny_patch16_224"  # the experiment's
    assert merged.model.backbone.patch_size == 8
    assert merged.model.adapter._target_ == cfg.model.adapter._target_ == "mtl.models.adapters.LoRA"
    assert merged.trainer == cfg.trainer and merged.paths == cfg.paths  # not stored sections
    # without command-line changes, the stored sections as they are
    plain = evaluation_config(make_cfg(), stored, [])
    for section in ("data", "model", "balancer", "flat"):
        assert OmegaConf.to_container(plain[section], resolve=True) == stored[section]
    # a value redacted when stored (it held a credential-like string) is never used as is
    stored["data"]["root"] = REDACTED
    assert evaluation_config(cfg, stored, []).data.root == cfg.data.root



def test_exported_pictures_undo_the_run_normalisation_not_imagenet():
    """A ViT run normalises with 0.5/0.5 (its weights' config): the side-by-side pictures must
    show the input as it was, which ImageNet constants would colour-shift."""
    import numpy as np
    import torch

    from mtl.export import denormalise

    rgb = np.random.default_rng(0).integers(0, 256, (3, 6, 7)).astype(np.float32)
    normalised = (torch.tensor(rgb) / 255 - 0.5) / 0.5
    shown = denormalise(normalised, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert np.array_equal(shown, np.moveaxis(rgb, 0, -1).astype(np.uint8))
    assert not np.array_equal(denormalise(normalised), shown)
