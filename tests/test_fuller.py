"""FULLER-style calibration: the balanced feature gradient of every level rescaled to their mean
norm before the backbone backward, for any Gramian method in rep mode."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mtl.balancers import build_balancer
from mtl.balancers.base import BalanceContext
from mtl.balancers.gramian import IMTL, PCGrad, equalized_levels
from mtl.config import ConfigError
from mtl.models.backbone import Backbone
from mtl.models.decoders import HRNetDecoder
from mtl.models.multitask import MultiTaskModel
from mtl.train import train

_context = BalanceContext.local


def test_levels_get_the_mean_norm_and_keep_their_direction():
    parts = [torch.full((4,), 3.0), torch.zeros(2), torch.tensor([0.0, 4.0]), torch.ones(9)]
    out = equalized_levels(parts, _context())
    mean = (6.0 + 4.0 + 3.0) / 3
    assert [float(p.norm()) for p in out] == pytest.approx([mean, 0.0, mean, mean])
    for before, after in zip(parts, out, strict=True):
        if before.norm() > 0:
            assert torch.allclose(after / after.norm(), before / before.norm())


def test_norms_are_those_of_the_global_batch_under_ddp():
    """Two processes with their halves of each level: the squared norms are summed over them."""
    local = [torch.tensor([3.0, 0.0]), torch.tensor([1.0])]
    other_squared = torch.tensor([16.0, 8.0])  # the other process's squared norms per level
    context = _context(world_size=2, all_reduce_mean=lambda t: (t + other_squared) / 2)
    out = equalized_levels(local, context)
    norms = torch.tensor([5.0, 3.0])  # global: sqrt(9 + 16), sqrt(1 + 8)
    scales = norms.mean() / norms
    assert torch.allclose(out[0], local[0] * scales[0]) and torch.allclose(
        out[1], local[1] * scales[1]
    )


def test_rep_mode_update_is_the_backward_of_the_calibrated_feature_gradient():
    torch.manual_seed(0)
    model = MultiTaskModel(
        Backbone("resnet18", out_indices=(1, 2, 3)), HRNetDecoder, {"a": 3, "b": 1}
    )
    images = torch.randn(2, 3, 32, 32)
    targets = {"a": torch.randn(2, 3, 32, 32), "b": torch.randn(2, 1, 32, 32)}
    decoded = model.decode(images, detach_features=True)
    losses = {t: ((decoded.preds[t] - targets[t]) ** 2).mean() for t in ("a", "b")}
    method = PCGrad(mode="rep")
    method.equalize_levels = True
    context = _context(
        shared_params=model.shared_parameters(),
        task_params=model.task_parameters(),
        features=decoded.features,
        head_inputs=decoded.head_inputs,
        model=model,
    )
    result = method.backward(losses, context)
    # expected: the weighted feature gradient, each level rescaled, pushed through the backbone
    fresh = model.decode(images, detach_features=True)
    fresh_losses = {t: ((fresh.preds[t] - targets[t]) ** 2).mean() for t in ("a", "b")}
    weighted = sum(result.weights[t] * fresh_losses[t] for t in ("a", "b"))
    level_grads = torch.autograd.grad(weighted, fresh.head_inputs)
    norms = torch.stack([g.norm() for g in level_grads])
    calibrated = [g * norms.mean() / n for g, n in zip(level_grads, norms, strict=True)]
    surrogate = sum((f * g).sum() for f, g in zip(fresh.features, calibrated, strict=True))
    expected = torch.autograd.grad(surrogate, model.shared_parameters())
    for p, e in zip(model.shared_parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-7)


def test_the_named_config_builds_imtl_in_rep_mode_with_calibration():
    node = OmegaConf.load("conf/balancer/fuller.yaml")
    method = build_balancer(node, None, ["semseg", "depth"])
    assert isinstance(method, IMTL) and method.mode == "rep" and method.equalize_levels
    assert "equalize_levels" in node  # the caller's config is left as it was


def test_fuller_trains(make_cfg):
    scores = train(make_cfg("balancer=fuller", "debug=fdr", "data.tasks=[semseg,depth]"))
    assert torch.isfinite(torch.tensor(scores["val/loss"]))


def test_calibration_outside_rep_mode_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="balancer.equalize_levels: true calibrates"):
        train(make_cfg("balancer=pcgrad", "+balancer.equalize_levels=true"))
