"""Backbone wrapper and multi-task model on tiny random-init timm models."""

import pytest
import torch

from mtl.models.backbone import Backbone
from mtl.models.decoders import ConvDecoder, HRNetDecoder, MultiTaskDecoder
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


@pytest.mark.parametrize("norm_last", [False, True])
def test_vit_taps_are_the_chosen_blocks_outputs_and_only_the_last_may_be_normed(norm_last):
    tiny = dict(img_size=(32, 48), patch_size=8, depth=4, embed_dim=32, num_heads=2)
    backbone = Backbone("vit_tiny_patch16_224", out_indices=(1, 3), norm_last=norm_last, **tiny)
    vit = backbone.model.model
    outputs = {}
    for i in (1, 3):
        vit.blocks[i].register_forward_hook(lambda _, __, out, i=i: outputs.__setitem__(i, out))
    features = backbone(torch.randn(2, 3, 32, 48))
    assert [tuple(f.shape) for f in features] == [(2, 32, 4, 6)] * 2  # NCHW at stride 8

    def grid(tokens):  # the hooked blocks see the class token first
        return tokens[:, 1:].reshape(2, 4, 6, 32).permute(0, 3, 1, 2)

    torch.testing.assert_close(features[0], grid(outputs[1]))
    last = grid(vit.norm(outputs[3])) if norm_last else grid(outputs[3])
    torch.testing.assert_close(features[1], last)
    assert isinstance(vit.norm, torch.nn.LayerNorm) == norm_last  # timm prunes an unused norm
    if norm_last:  # the norm changes the map (the comparison above can tell them apart)
        assert not torch.allclose(features[1], grid(outputs[3]))


def test_norm_last_needs_a_model_with_a_final_norm():
    with pytest.raises(ValueError, match="model.backbone.norm_last"):
        Backbone("resnet18", out_indices=(1, 2), norm_last=True)


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


def test_the_kept_stem_is_what_a_cnns_first_stage_reads_and_vits_have_none():
    model = MultiTaskModel(Backbone("resnet18", out_indices=(1, 2)), ConvDecoder, {"a": 2})
    resnet = model.backbone.model
    read = []
    resnet.layer1.register_forward_pre_hook(lambda _, args: read.append(args[0]))
    decoded = model.decode(torch.randn(2, 3, 64, 96), keep_stem=True)
    assert decoded.stem is read[0] and decoded.stem.grad_fn is not None
    stem = [resnet.conv1.weight, resnet.bn1.weight, resnet.bn1.bias]
    assert [id(p) for p in model.backbone.stem_parameters()] == [id(p) for p in stem]
    assert model.decode(torch.randn(2, 3, 64, 96)).stem is None  # kept only when asked
    assert not resnet.maxpool._forward_hooks  # and the hook is gone
    vit = Backbone("vit_tiny_patch16_224", **BACKBONES["vit_tiny_patch16_224"])
    assert vit.stem() is None and vit.stem_parameters() == []


class _SharedStemDecoder(MultiTaskDecoder):
    """A multi-task decoder with one conv every task reads, a head per task and a per-task
    auxiliary loss (the mean squared shared activation, times the task's index + 1)."""

    def __init__(self, in_channels, in_strides, task_channels):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels[-1], 8, 1)
        self.heads = torch.nn.ModuleDict(
            {t: torch.nn.Conv2d(8, c, 1) for t, c in task_channels.items()}
        )
        self.calls: list[list[str]] = []
        self._aux: dict[str, torch.Tensor] = {}

    @property
    def tasks(self):
        return list(self.heads)

    def forward(self, inputs):
        self.calls.append(list(inputs))
        out, self._aux = {}, {}
        for i, (task, features) in enumerate(inputs.items()):
            shared = self.stem(features[-1])
            self._aux[task] = (i + 1) * shared.pow(2).mean()
            out[task] = self.heads[task](shared)
        return out

    def task_parameters(self, task):
        return list(self.heads[task].parameters())

    def auxiliary_losses(self):
        return dict(self._aux)


def test_a_multitask_decoder_is_built_once_and_its_shared_parameters_are_balanced():
    backbone = Backbone("resnet18", out_indices=(1, 2))
    model = MultiTaskModel(backbone, _SharedStemDecoder, {"semseg": 5, "depth": 1})
    assert isinstance(model.decoders, _SharedStemDecoder)
    stem = {id(p) for p in model.decoders.stem.parameters()}
    assert stem <= {id(p) for p in model.shared_parameters()}
    own = model.task_parameters()
    head = model.decoders.heads["depth"]
    assert {id(p) for p in own["depth"]} == {id(p) for p in head.parameters()}
    assert not stem & {id(p) for params in own.values() for p in params}

    preds = model(torch.randn(2, 3, 32, 48), ["depth"])  # one task: only its part runs
    assert model.decoders.calls[-1] == ["depth"] and preds["depth"].shape == (2, 1, 32, 48)
    model(torch.randn(2, 3, 32, 48))
    aux = model.auxiliary_losses()
    assert set(aux) == {"semseg", "depth"}
    torch.testing.assert_close(aux["depth"], 2 * aux["semseg"])


def test_per_task_heads_keep_their_checkpoint_keys_and_own_every_parameter():
    model = MultiTaskModel(Backbone("resnet18", out_indices=(1, 2)), ConvDecoder, {"depth": 1})
    assert any(k.startswith("decoders.depth.") for k in model.state_dict())
    assert model.decoders.shared_parameters() == []
    assert len(model.shared_parameters()) == len(list(model.backbone.parameters()))
