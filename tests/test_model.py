"""Backbone wrapper and multi-task model on tiny random-init timm models."""

import pytest
import torch

from mtl.models.backbone import Backbone
from mtl.models.decoders import ConvDecoder, HRNetDecoder
from mtl.models.multitask import MultiTaskModel
from mtl.models.pretrained import WeightsError

BACKBONES = {
    "resnet18": dict(out_indices=(1, 2, 3, 4)),
    "vit_tiny_patch16_224": dict(img_size=(32, 48), patch_size=8, out_indices=(1, 3)),
    "swin_tiny_patch4_window7_224": dict(img_size=(32, 32), window_size=4),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_returns_nchw_maps_matching_its_description(name):
    backbone = Backbone(name, **BACKBONES[name])
    images = torch.randn(2, 3, *BACKBONES[name].get("img_size", (64, 96)))
    features = backbone(images)
    assert len(features) == len(backbone.out_channels) == len(backbone.out_strides)
    for feature, channels, stride in zip(
        features, backbone.out_channels, backbone.out_strides, strict=True
    ):
        assert feature.shape[:2] == (2, channels)
        assert feature.shape[-2:] == (images.shape[-2] // stride, images.shape[-1] // stride)


def test_backbone_rejects_unknown_model_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="not a timm model"):
        Backbone("resnet_does_not_exist")
    with pytest.raises(WeightsError, match="pretrained_file: no file at"):
        Backbone("resnet18", pretrained_file=str(tmp_path / "missing.safetensors"))


def test_backbone_loads_local_pretrained_file(tmp_path):
    source = Backbone("resnet18", out_indices=(1, 2))
    path = tmp_path / "resnet18.pth"
    torch.save(source.model.state_dict(), path)
    loaded = Backbone("resnet18", pretrained_file=str(path), out_indices=(1, 2))
    for a, b in zip(
        source.model.state_dict().values(), loaded.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decoder", [ConvDecoder, HRNetDecoder])
def test_model_predicts_each_requested_task_at_input_size(decoder):
    backbone = Backbone("resnet18", out_indices=(1, 2, 3, 4))
    model = MultiTaskModel(backbone, decoder, {"semseg": 5, "depth": 1, "normals": 3})
    images = torch.randn(2, 3, 48, 64)
    preds = model(images)
    assert {k: tuple(v.shape) for k, v in preds.items()} == {
        "semseg": (2, 5, 48, 64),
        "depth": (2, 1, 48, 64),
        "normals": (2, 3, 48, 64),
    }
    assert list(model(images, ["depth"])) == ["depth"]
    with pytest.raises(KeyError, match="no head"):
        model(images, ["edge"])


def test_shared_and_task_parameters_partition_the_model():
    model = MultiTaskModel(Backbone("resnet18", out_indices=(1, 2)), ConvDecoder, {"a": 2, "b": 1})
    shared = {id(p) for p in model.shared_parameters()}
    per_task = [{id(p) for p in ps} for ps in model.task_parameters().values()]
    assert not shared & per_task[0] and not shared & per_task[1] and not per_task[0] & per_task[1]
    assert shared | per_task[0] | per_task[1] == {id(p) for p in model.parameters()}
