"""``balancer.jacobian=streamed``: the same weights and update as the stored Jacobian, without
holding it, and a logged fallback where the backward cannot be batched."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bench.timing import exact_rss_accounting, peak_rss_growth_mib
from mtl.balancers import build_balancer
from mtl.balancers.base import BalanceContext

CONF = Path(__file__).resolve().parents[1] / "conf" / "balancer"
TASKS = ["semseg", "depth", "normals"]


class TinyMultiTask(nn.Module):
    """A conv trunk with BatchNorm (shared) and one 1x1 head per task."""

    def __init__(self, width: int = 8, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, 1) for _ in range(tasks))

    def losses(self, images: torch.Tensor, trunk: nn.Module | None = None) -> dict:
        features = (trunk or self.trunk)(images)
        # losses of different kinds and scales, so that the tasks conflict and weights differ
        preds = [head(features) for head in self.heads]
        return {
            TASKS[0]: (preds[0] - 1).square().mean(),
            TASKS[1]: 3 * (preds[1] + images[:, :1]).abs().mean(),
            TASKS[2]: torch.nn.functional.softplus(-preds[2] * features[:, :1]).mean(),
        }

    def context(self) -> BalanceContext:
        return BalanceContext.local(
            shared_params=list(self.trunk.parameters()),
            task_params={t: list(h.parameters()) for t, h in zip(TASKS, self.heads, strict=True)},
        )


def _step(name: str, jacobian: str, trunk_wrapper=None) -> tuple[dict, list[torch.Tensor]]:
    """Weights and every parameter's gradient after one balancer backward."""
    model = TinyMultiTask()
    config = OmegaConf.load(CONF / f"{name}.yaml")
    config.jacobian = jacobian
    balancer = build_balancer(config, None, TASKS)
    images = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    trunk = trunk_wrapper(model.trunk) if trunk_wrapper else None
    result = balancer.backward(model.losses(images, trunk), model.context())
    return result.weights, [p.grad.clone() for p in model.parameters()]


def _assert_same_step(first, second) -> None:
    (weights, grads), (weights2, grads2) = first, second
    for task in TASKS:
        assert abs(weights[task] - weights2[task]) <= 1e-6, (weights, weights2)
    update, update2 = (torch.cat([g.reshape(-1) for g in gs]) for gs in (grads, grads2))
    assert (update - update2).abs().max() <= 1e-6 * update.abs().max()


@pytest.mark.parametrize("name", ["upgrad", "mgda", "nash", "pcgrad", "imtl_full"])
def test_streamed_gives_the_weights_and_update_of_the_stored_jacobian(name):
    """Same weights (to 1e-6) and same gradients of the shared and head parameters (to 1e-6 of
    the largest), through the config key `build_balancer` reads (imtl_full: the Gramian
    method inside a composite)."""
    stored = _step(name, "stored")
    _assert_same_step(stored, _step(name, "streamed"))
    assert len(set(stored[0].values())) > 1  # the tasks got different weights


class _Wide(nn.Module):
    """A shared trunk of four 1024 x 1024 layers: its Jacobian dominates the step's memory."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))
        self.heads = nn.ModuleList(nn.Linear(1024, 1) for _ in range(4))


def test_streamed_never_holds_the_task_jacobian():
    """T = 4 tasks on 4M shared parameters: the stored Jacobian alone is 64 MiB; streamed
    needs the update's gradients (16 MiB) and a few rows at a time."""
    if not exact_rss_accounting():
        pytest.skip("peak memory is measured with glibc's allocator")
    model, x = _Wide(), torch.randn(2, 1024, generator=torch.Generator().manual_seed(0))
    tasks = [f"t{i}" for i in range(4)]
    context = BalanceContext.local(
        shared_params=list(model.layers.parameters()),
        task_params={t: list(h.parameters()) for t, h in zip(tasks, model.heads, strict=True)},
    )

    def step(jacobian: str):
        balancer = build_balancer(OmegaConf.create({**OmegaConf.load(CONF / "upgrad.yaml"),
                                                   "jacobian": jacobian}), None, tasks)

        def run() -> None:
            model.zero_grad(set_to_none=True)
            features = model.layers(x)
            balancer.backward({t: h(features).square().mean() for t, h in
                               zip(tasks, model.heads, strict=True)}, context)

        run()
        model.zero_grad(set_to_none=True)
        return peak_rss_growth_mib(run)

    stored, streamed = step("stored"), step("streamed")
    assert stored > 64
    assert streamed < 40 and streamed < stored / 2, (stored, streamed)


class _NoBatchingRule(torch.autograd.Function):
    """Identity whose backward reads a number out of its gradient (``.item()`` has no
    batching rule: like some fused kernels, it cannot run under ``vmap``)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * (1.0 if grad.abs().sum().item() >= 0 else 0.0)


class _Unbatchable(nn.Module):
    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoBatchingRule.apply(self.trunk(x))


def test_streamed_falls_back_to_the_stored_jacobian_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="mtl.balancers.gramian"):
        fallback = _step("upgrad", "streamed", _Unbatchable)
    assert "balancer.jacobian=streamed: the batched backward failed" in caplog.text
    assert "item()" in caplog.text  # the operator that could not be batched
    _assert_same_step(_step("upgrad", "stored", _Unbatchable), fallback)
