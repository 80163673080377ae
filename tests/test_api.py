"""`mtl.load`: a trained model from its checkpoint alone, ready for predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mtl
from mtl.checkpoint import CONFIG_KEY, CheckpointError
from mtl.data.nyud import NYUDDataset
from mtl.module import MultiTaskModule

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "edge", "sal"]


@pytest.fixture(scope="module")
def loaded(trained_run):
    return mtl.load(trained_run / "checkpoints" / "last.ckpt")


def test_load_gives_the_model_in_eval_mode_with_what_using_it_needs(loaded, trained_run):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not loaded.model.training
    assert loaded.tasks == TASKS
    assert loaded.class_names == {"semseg": ["floor", "wall", "sphere", "box", "cylinder"]}
    assert loaded.num_classes == {"semseg": 5}
    assert loaded.input_size == (48, 64) and loaded.protocol == "pad"
    assert (loaded.epoch, loaded.step) == (checkpoint["epoch"], checkpoint["global_step"])
    assert loaded.config.model.decoder.hidden_channels == 16  # the stored config's model
    state = loaded.model.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("model."):
            assert torch.equal(state[key[len("model.") :]], value), key


def test_predictions_of_the_loaded_model_reproduce_the_runs_scores(loaded, trained_run):
    """Pixel accuracy and pooled depth RMSE of `predict` over the validation images, computed
    by hand, equal the run's final validation scores (taken on the same checkpoint)."""
    data_root = Path(loaded.config.data.root)
    dataset = NYUDDataset(data_root, "val", ["semseg", "depth"])
    correct = valid = 0
    squared, count = 0.0, 0
    for index in range(len(dataset)):
        sample = dataset.load_sample(index)
        predictions = loaded.predict(sample["image"])
        labels = torch.from_numpy(sample["semseg"].astype(np.int64))
        mask = labels != 255
        correct += int((predictions["semseg"][mask] == labels[mask]).sum())
        valid += int(mask.sum())
        depth = torch.from_numpy(sample["depth"])
        has_depth = depth > 0
        squared += float(((predictions["depth"][0] - depth)[has_depth] ** 2).double().sum())
        count += int(has_depth.sum())
    scores = json.loads((trained_run / "metrics.json").read_text())
    assert correct / valid == pytest.approx(scores["val/semseg/pixel_acc"], rel=1e-5)
    assert (squared / count) ** 0.5 == pytest.approx(scores["val/depth/rmse"], rel=1e-4)


@pytest.mark.parametrize("size", [(100, 150), (30, 20), (48, 64)])
def test_predictions_come_at_the_images_own_size(loaded, size):
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    predictions = loaded.predict(image)
    assert predictions["semseg"].shape == size and predictions["semseg"].dtype == torch.int64
    assert int(predictions["semseg"].max()) < 5
    assert predictions["depth"].shape == (1, *size) and float(predictions["depth"].min()) >= 0
    norms = predictions["normals"].norm(dim=0)
    assert predictions["normals"].shape == (3, *size) and torch.allclose(norms, torch.ones(size))
    for task in ("edge", "sal"):
        assert 0 <= float(predictions[task].min()) <= float(predictions[task].max()) <= 1


def test_an_image_larger_than_the_input_is_shrunk_to_fit_then_scaled_back(loaded):
    """A 96x128 image runs at 48x64: its prediction is the 48x64 prediction of the shrunk
    image, upsampled (compared on the raw scores the classes come from)."""
    image = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    inputs, inside = loaded.transform(image)
    assert tuple(inputs.shape) == (1, 3, 48, 64) and inside == (48, 64)
    depth = loaded.predict(image)["depth"]
    with torch.no_grad():
        raw = loaded.model(inputs, ["depth"])["depth"]
    expected = torch.nn.functional.interpolate(raw, (96, 128), mode="bilinear").clamp_min(0)
    assert torch.allclose(depth, expected[0], atol=1e-5)


def test_load_from_checkpoint_rebuilds_the_module_from_the_stored_config(trained_run):
    path = trained_run / "checkpoints" / "last.ckpt"
    module = MultiTaskModule.load_from_checkpoint(path)
    assert isinstance(module, MultiTaskModule) and not module.training
    assert module.tasks == TASKS
    checkpoint = torch.load(path, weights_only=True)
    state = module.state_dict()
    assert set(state) == set(checkpoint["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())


def test_a_checkpoint_without_a_stored_config_is_named(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint[CONFIG_KEY]
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} holds no stored config"):
        mtl.load(path)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        mtl.load(tmp_path / "missing.ckpt")


def test_import_mtl_stays_light():
    code = "import sys, mtl; print(sorted({'torch', 'lightning', 'timm'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
    assert callable(mtl.load)
