"""Each loss against a value computed by hand on a tiny case."""

import math

import torch

from mtl import losses


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_cross_entropy_ignores_255():
    pred = torch.zeros(1, 2, 1, 2)
    pred[0, 0, 0, 0] = math.log(3.0)  # p(class 0) = 3/4 at the first pixel
    target = torch.tensor([[[0, 255]]])
    assert torch.isclose(losses.cross_entropy(pred, target), torch.tensor(-math.log(0.75)))


def test_cross_entropy_all_ignored_is_zero_with_gradient():
    pred = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = losses.cross_entropy(pred, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0 and pred.grad is not None and pred.grad.abs().sum() == 0


def test_edge_bce_weights_positives_095():
    pred = torch.tensor([_logit(0.8), _logit(0.3), 0.0]).view(1, 1, 1, 3)
    target = torch.tensor([1.0, 0.0, 255.0]).view(1, 1, 1, 3)
    expected = (0.95 * -math.log(0.8) + 0.05 * -math.log(0.7)) / 2
    assert torch.isclose(losses.edge_bce(pred, target), torch.tensor(expected), atol=1e-6)


def test_balanced_bce_weights_by_share_of_negatives():
    # one positive, three negatives: positives weighted 3/4, negatives 1/4
    probs = [0.6, 0.2, 0.1, 0.4]
    pred = torch.tensor([_logit(p) for p in probs]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    expected = (0.75 * -math.log(0.6) + 0.25 * sum(-math.log(1 - p) for p in probs[1:])) / 4
    assert torch.isclose(losses.balanced_bce(pred, target), torch.tensor(expected), atol=1e-6)


def test_depth_l1_on_valid_pixels_only():
    pred = torch.tensor([1.0, 5.0, 2.0]).view(1, 1, 1, 3)
    target = torch.tensor([2.0, 0.0, 4.0]).view(1, 1, 1, 3)
    assert torch.isclose(losses.depth_l1(pred, target), torch.tensor(1.5))


def test_normals_l1_normalises_prediction_and_skips_invalid():
    pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 7.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    # valid pixel: |(1,0,0) - (0,1,0)|_1 = 2 over its 3 channels
    assert torch.isclose(losses.normals_l1(pred, target), torch.tensor(2 / 3))


def test_loss_options_from_the_data_config_reach_the_task_loss(make_cfg):
    from mtl.train import build_module

    cfg = make_cfg("data.tasks=[semseg,edge]", "+data.loss_options={edge:{pos_weight:0.88}}")
    module = build_module(cfg)
    pred = torch.tensor([_logit(0.8), _logit(0.3), 0.0]).view(1, 1, 1, 3)
    target = torch.tensor([1.0, 0.0, 255.0]).view(1, 1, 1, 3)
    expected = (0.88 * -math.log(0.8) + 0.12 * -math.log(0.7)) / 2
    loss = module.task_losses({"edge": pred}, {"edge": target}, tasks=["edge"])["edge"]
    assert torch.isclose(loss, torch.tensor(expected), atol=1e-6)
