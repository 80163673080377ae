"""Pretrained backbone weights: from a local file or the offline Hugging Face cache, checked
tensor by tensor before training; frozen-backbone adapters refused on random weights; the input
normalisation of the weights' timm pretrained config."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from mtl.config import ConfigError, validate_config
from mtl.data.gpu_augment import gpu_augment_pipeline
from mtl.models.backbone import Backbone
from mtl.models.pretrained import WeightsError
from mtl.train import build_datamodule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RESNET = dict(out_indices=(1, 2, 3, 4))
TINY_VIT = dict(img_size=(32, 48), patch_size=8, out_indices=(1, 3))
REAL_EXPERIMENTS = sorted(
    p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem.startswith(("nyud", "pascal"))
)


def _timm_file(path: Path, name: str, keep=lambda i, key: True, **kwargs) -> dict:
    """The state dict of a full timm model, as a user would save it, with a subset kept."""
    state = timm.create_model(name, **kwargs).state_dict()
    state = {k: v for i, (k, v) in enumerate(state.items()) if keep(i, k)}
    torch.save(state, path)
    return state


def _hub_cache(cache: Path, repo: str, state: dict) -> None:
    """A Hugging Face hub cache holding `repo`'s `model.safetensors`, in the hub's layout."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")


# --------------------------------------------------------------------------- loading a file


def test_matching_file_loads_every_tensor_and_reports_the_counts(tmp_path, caplog):
    state = _timm_file(tmp_path / "r18.pth", "resnet18")
    with caplog.at_level(logging.INFO, logger="mtl.models.pretrained"):
        backbone = Backbone("resnet18", pretrained_file=str(tmp_path / "r18.pth"), **RESNET)
    loaded = backbone.model.state_dict()
    assert len(loaded) == len(state) - 2  # the classifier (fc.weight, fc.bias) is not backbone
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("120 of 120 backbone tensors matched, 0 missing, 0 unexpected" in m for m in lines)


def test_vit_file_for_another_input_and_patch_size_is_resampled_by_timm(tmp_path):
    state = _timm_file(tmp_path / "vit.pth", "vit_tiny_patch16_224")  # 224x224, patch 16
    backbone = Backbone(
        "vit_tiny_patch16_224", pretrained_file=str(tmp_path / "vit.pth"), **TINY_VIT
    )
    loaded = backbone.model.model.state_dict()
    assert torch.equal(loaded["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    assert loaded["pos_embed"].shape[1] == 1 + (32 // 8) * (48 // 8)
    assert loaded["patch_embed.proj.weight"].shape[-2:] == (8, 8)


def test_swin_file_loads_into_the_stage_layout_of_the_feature_model(tmp_path):
    state = _timm_file(tmp_path / "swin.pth", "swin_tiny_patch4_window7_224")
    backbone = Backbone(
        "swin_tiny_patch4_window7_224",
        pretrained_file=str(tmp_path / "swin.pth"),
        img_size=(32, 32),
        window_size=4,  # the relative position tables are resized by timm
    )
    loaded = backbone.model.state_dict()
    key = "layers.1.downsample.reduction.weight"
    assert torch.equal(loaded[key.replace("layers.1", "layers_1")], state[key])
    assert torch.equal(
        loaded["layers_3.blocks.1.mlp.fc2.weight"], state["layers.3.blocks.1.mlp.fc2.weight"]
    )


def test_file_with_half_its_tensors_missing_is_refused(tmp_path):
    path = tmp_path / "half.pth"
    _timm_file(path, "resnet18", keep=lambda i, key: i % 2 == 0)
    with pytest.raises(WeightsError) as info:
        Backbone("resnet18", pretrained_file=str(path), **RESNET)
    message = str(info.value)
    assert message.startswith(f"model.backbone.pretrained_file: '{path}'")
    assert "60 of 120 backbone tensors matched, 60 missing, 0 unexpected" in message
    assert "missing: conv1.weight" not in message  # kept: index 0
    assert "missing: bn1.weight" in message  # the first dropped tensor is named
    assert "model.backbone.pretrained_strict=false" in message


def test_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    _timm_file(path, "resnet18")
    with pytest.raises(
        WeightsError, match=r"0 of 52 backbone tensors matched, 52 missing, 122 unexpected"
    ):
        Backbone("vit_tiny_patch16_224", pretrained_file=str(path), **TINY_VIT)


def test_tensors_of_another_shape_count_as_mismatched(tmp_path):
    path = tmp_path / "narrow.pth"
    _timm_file(path, "vit_tiny_patch16_224", embed_dim=96, num_heads=3)
    with pytest.raises(WeightsError) as info:
        Backbone("vit_tiny_patch16_224", pretrained_file=str(path), **TINY_VIT)
    assert "of another shape: cls_token [1, 1, 96] (model [1, 1, 192])" in str(info.value)


def test_partial_file_loads_with_a_warning_when_allowed(tmp_path, caplog):
    path = tmp_path / "half.pth"
    state = _timm_file(path, "resnet18", keep=lambda i, key: i % 2 == 0)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="mtl.models.pretrained"):
        backbone = Backbone(
            "resnet18", pretrained_file=str(path), pretrained_strict=False, **RESNET
        )
    loaded = backbone.model.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
    assert "bn1.weight" not in state and "bn1.weight" in loaded
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("60 of 120 backbone tensors matched, 60 missing" in m for m in warnings), warnings


def test_unreadable_file_is_a_weights_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="model.backbone.pretrained_file: cannot read"):
        Backbone("resnet18", pretrained_file=str(path), **RESNET)


# --------------------------------------------------------------------------- the hub cache


def test_pretrained_true_reads_the_offline_hub_cache(tmp_path, monkeypatch):
    state = timm.create_model("resnet18").state_dict()
    _hub_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", state)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backbone = Backbone("resnet18", pretrained=True, **RESNET)
    assert torch.equal(
        backbone.model.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"]
    )


def test_pretrained_true_without_the_cache_names_it_and_how_to_fill_it(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as info:
        Backbone("swin_tiny_patch4_window7_224.ms_in1k", pretrained=True)
    message = str(info.value)
    assert message.startswith("model.backbone.pretrained: ")
    assert str(tmp_path / "empty") in message
    assert "hf download timm/swin_tiny_patch4_window7_224.ms_in1k" in message
    assert "model.backbone.pretrained_file=PATH" in message


# --------------------------------------------------------------------------- config checks


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=pascal_swin_tiny_mtlora_equal", "model.backbone.pretrained=false"],
        ["data=nyud", "model/backbone=vit_tiny", "model/adapter=lora"],
    ],
)
def test_frozen_adapter_on_random_weights_is_refused_on_real_data(overrides):
    with pytest.raises(ConfigError) as info:
        validate_config(_compose(*overrides))
    message = str(info.value)
    assert "model.backbone.pretrained_file: null" in message and "freezes" in message


def test_frozen_adapter_on_random_weights_is_a_warning_on_synthetic_scenes(caplog):
    with caplog.at_level(logging.WARNING, logger="mtl.config"):
        validate_config(_compose("experiment=synthetic_vit_tiny_lora_equal"))
    assert any("model.backbone.pretrained_file" in r.getMessage() for r in caplog.records)


def test_random_backbone_on_real_data_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mtl.config"):
        validate_config(_compose("data=nyud"))
    assert any(
        "resnet18 starts from random weights on nyud" in r.getMessage() for r in caplog.records
    )


def test_missing_weights_are_reported_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    cfg = _compose("experiment=nyud_vit_base_none_equal")
    with pytest.raises(ConfigError, match="model.backbone.pretrained: .* not in the Hugging"):
        validate_config(cfg)
    cfg = _compose(f"model.backbone.pretrained_file={tmp_path / 'none.pth'}")
    with pytest.raises(ConfigError, match="model.backbone.pretrained_file: no file at"):
        validate_config(cfg)


@pytest.mark.parametrize("experiment", REAL_EXPERIMENTS)
def test_real_experiments_name_the_timm_weights_they_expect(experiment):
    backbone = _compose(f"experiment={experiment}").model.backbone
    assert backbone.pretrained is True
    name = backbone.name
    assert "." in name, "architecture.tag"
    assert timm.get_pretrained_cfg(name).hf_hub_id == f"timm/{name}"
    assert f"timm/{name}" in (CONF / "experiment" / f"{experiment}.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"hf download timm/{name}" in readme
    # the weights table of the README names the experiment next to its weights
    rows = [r for r in readme.splitlines() if r.startswith("| ") and "`timm/" in r]
    assert [r for r in rows if f"`{experiment}`" in r and f"`timm/{name}`" in r], experiment


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("backbone", "mean", "std"),
    [
        ("resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("vit_tiny", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_normalisation_follows_the_backbone_weights(make_cfg, backbone, mean, std):
    cfg = make_cfg(f"model/backbone={backbone}")
    sample = {
        "image": np.full((8, 8, 3), 255, np.uint8),
        "semseg": np.zeros((8, 8), np.uint8),
        "meta": {"id": "x", "orig_size": (8, 8), "pad": (0, 0, 0, 0)},
    }
    datamodule = build_datamodule(cfg.data)
    image = datamodule.val_transform(sample)["image"]
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(image[:, 0, 0], expected)
    last = datamodule.train_transform.transforms[-1]  # the training pipeline's normalisation
    assert last.mean == pytest.approx(mean) and last.std == pytest.approx(std)
    _, augment = gpu_augment_pipeline(dict(cfg.data.train_transform))
    assert augment.mean == pytest.approx(mean) and augment.std == pytest.approx(std)


def test_normalisation_can_be_set(make_cfg):
    cfg = make_cfg("data.mean=[0.1,0.2,0.3]", "data.std=[1,1,1]")
    transform = build_datamodule(cfg.data).val_transform
    image = transform({"image": np.zeros((4, 4, 3), np.uint8), "meta": {}})["image"]
    torch.testing.assert_close(image[:, 0, 0], -torch.tensor([0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------- the command line


def _train(*args: str, env: dict | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_command_line_reports_bad_weights_in_one_line(tmp_path):
    path = tmp_path / "half.pth"
    _timm_file(path, "resnet18", keep=lambda i, key: i % 2 == 0)
    result = _train(f"model.backbone.pretrained_file={path}", "debug=fdr", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "model.backbone.pretrained_file" in errors[0] and "60 missing" in errors[0]

    # the key exists, so `+` gets Hydra's one-paragraph advice (no TypeError from timm)
    result = _train("+model.backbone.pretrained=true", "debug=fdr", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "TypeError" not in result.stderr
    assert "Either remove + prefix: 'model.backbone.pretrained=true'" in result.stderr
