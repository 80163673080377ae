"""The DeepLabV3 ASPP head on tiny random-init backbones."""

import pytest
import torch

from mtl.models.backbone import Backbone
from mtl.models.decoders import ASPPDecoder
from mtl.models.decoders.aspp import scaled_rates
from mtl.models.multitask import MultiTaskModel

TINY_VIT = dict(img_size=(32, 48), patch_size=8, out_indices=(1, 3))


@pytest.mark.parametrize(
    "name, kwargs, size, stride, rates",
    [
        ("vit_tiny_patch16_224", TINY_VIT, (32, 48), 8, [24, 48, 72]),
        ("resnet18", dict(out_indices=(1, 2, 3, 4)), (64, 96), 32, [6, 12, 18]),
    ],
)
def test_aspp_reads_the_coarsest_level_with_rates_rescaled_to_its_stride(
    name, kwargs, size, stride, rates
):
    backbone = Backbone(name, **kwargs)
    head = ASPPDecoder(backbone.out_channels, backbone.out_strides, 3, hidden_channels=16)
    assert head.level == len(backbone.out_strides) - 1  # a ViT's deepest tap; ResNet's stage 4
    # 12/24/36 at stride 16 span 192/384/576 input pixels; so do the rescaled dilations
    assert head.rates == rates and [r * stride for r in rates] == [192, 384, 576]
    assert [b[0].dilation[0] for b in head.branches[1:]] == rates
    features = backbone(torch.randn(2, 3, *size))
    assert head(features).shape == (2, 3, size[0] // stride, size[1] // stride)
    model = MultiTaskModel(backbone, ASPPDecoder, {"semseg": 5, "depth": 1})
    assert model(torch.randn(2, 3, *size))["semseg"].shape == (2, 5, *size)


def test_rates_round_and_never_fall_below_one():
    assert scaled_rates([12, 24, 36], 16, 8) == [24, 48, 72]
    assert scaled_rates([1, 3], 16, 64) == [1, 1]  # 0.25 and 0.75 pixels: no dilation


def test_pooling_branch_is_constant_over_the_map_and_reads_the_whole_image():
    torch.manual_seed(0)
    head = ASPPDecoder([8], [16], 2, hidden_channels=16, rates=[2]).eval()
    x = torch.randn(2, 8, 6, 7)
    pooled = head.pyramid([x])[:, -16:]  # the last branch
    assert torch.equal(pooled, pooled[:, :, :1, :1].expand_as(pooled))
    assert not torch.allclose(pooled[0], pooled[1])  # per image
    x2 = x.clone()
    x2[:, :, 0, 0] += 5.0  # one corner: the other corner's pooled value moves, its 1x1 does not
    before, after = head.pyramid([x]), head.pyramid([x2])
    assert not torch.allclose(before[:, -16:, -1, -1], after[:, -16:, -1, -1])
    torch.testing.assert_close(before[:, :16, -1, -1], after[:, :16, -1, -1])


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_trains_at_batch_size_one(norm):
    torch.manual_seed(0)
    head = ASPPDecoder([8, 16], [8, 16], 3, hidden_channels=32, norm=norm).train()
    features = [torch.randn(1, 8, 4, 6), torch.randn(1, 16, 2, 3)]
    out = head(features)
    out.square().mean().backward()
    assert out.shape == (1, 3, 2, 3)
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert head.pooling[1].weight.grad.abs().sum() > 0  # the pooling branch learns too
