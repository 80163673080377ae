"""``balancer.jacobian=streamed``: the same weights and update as the stored Jacobian, without
holding it, and a logged fallback where the backward cannot be batched."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bench.timing import exact_rss_accounting, peak_rss_growth_mib
from mtl.balancers import build_balancer
from mtl.balancers.base import BalanceContext
from mtl.balancers.streamed import ends_at_features

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "balancer"
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

    def losses(self, images: torch.Tensor, trunk: nn.Module | None = None, around=False):
        """(features, losses); `around`: one loss also reaches the trunk around the features."""
        features = (trunk or self.trunk)(images)
        # losses of different kinds and scales, so that the tasks conflict and weights differ
        preds = [head(features) for head in self.heads]
        losses = {
            TASKS[0]: (preds[0] - 1).square().mean(),
            TASKS[1]: 3 * (preds[1] + images[:, :1]).abs().mean(),
            TASKS[2]: torch.nn.functional.softplus(-preds[2] * features[:, :1]).mean(),
        }
        if around:  # like an auxiliary loss of the backbone (MoE balancing)
            losses[TASKS[1]] = losses[TASKS[1]] + self.trunk[0].weight.square().sum()
        return features, losses

    def context(self, features: torch.Tensor | None) -> BalanceContext:
        return BalanceContext.local(
            shared_params=list(self.trunk.parameters()),
            task_params={t: list(h.parameters()) for t, h in zip(TASKS, self.heads, strict=True)},
            features=None if features is None else [features],
        )


def _step(
    name: str, jacobian: str, trunk_wrapper=None, features=True, around=False, stem=False
) -> tuple[dict, list[torch.Tensor]]:
    """Weights and every parameter's gradient after one balancer backward (`features`: the
    context names the trunk's output as the shared features; `stem`: and the output of the
    trunk's first convolution, BatchNorm and ReLU as the stem)."""
    model = TinyMultiTask()
    config = OmegaConf.load(CONF / f"{name}.yaml")
    config.jacobian = jacobian
    balancer = build_balancer(config, None, TASKS)
    images = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    kept: list[torch.Tensor] = []
    model.trunk[2].register_forward_hook(lambda *args: kept.append(args[-1]))
    trunk = trunk_wrapper(model.trunk) if trunk_wrapper else None
    shared, losses = model.losses(images, trunk, around)
    context = model.context(shared if features else None)
    if stem:
        context.stem, context.stem_params = kept[0], list(model.trunk[:3].parameters())
    result = balancer.backward(losses, context)
    return result.weights, [p.grad.clone() for p in model.parameters()]


def _assert_same_step(first, second) -> None:
    (weights, grads), (weights2, grads2) = first, second
    for task in TASKS:
        assert abs(weights[task] - weights2[task]) <= 1e-6, (weights, weights2)
    update, update2 = (torch.cat([g.reshape(-1) for g in gs]) for gs in (grads, grads2))
    assert (update - update2).abs().max() <= 1e-6 * update.abs().max()


@pytest.mark.parametrize(
    "name,features,around",
    [
        ("upgrad", True, False),
        ("mgda", True, False),
        ("nash", True, False),
        ("pcgrad", True, False),
        ("imtl_full", True, False),
        ("upgrad", False, False),  # no features named: the batched backward starts at the losses
        ("upgrad", True, True),  # a loss reaches the trunk around the features: the same
    ],
)
def test_streamed_gives_the_weights_and_update_of_the_stored_jacobian(name, features, around):
    """Same weights (to 1e-6) and same gradients of the shared and head parameters (to 1e-6 of
    the largest), through the config key `build_balancer` reads (imtl_full: the Gramian
    method inside a composite); heads backpropagated once each when the losses reach the trunk
    only through the features, through the whole batched backward otherwise."""
    stored = _step(name, "stored", features=features, around=around)
    _assert_same_step(stored, _step(name, "streamed", features=features, around=around))
    assert len(set(stored[0].values())) > 1  # the tasks got different weights


@pytest.mark.parametrize("name", ["upgrad", "pcgrad"])
def test_a_stem_backpropagated_per_task_gives_the_same_weights_and_update(name):
    """The batched backward stops at the stem; its parameters' rows come from one plain
    backward per task: the same Gramian, weights and update as the stored Jacobian."""
    stored = _step(name, "stored", stem=True)
    _assert_same_step(stored, _step(name, "streamed", stem=True))
    assert len(set(stored[0].values())) > 1


def test_the_head_passes_are_used_only_when_the_losses_reach_the_trunk_through_the_features():
    model = TinyMultiTask()
    images = torch.randn(2, 3, 6, 6)
    shared = list(model.trunk.parameters())
    features, losses = model.losses(images)
    assert ends_at_features(losses, [features], shared)
    features, losses = model.losses(images, around=True)
    assert not ends_at_features(losses, [features], shared)
    assert not ends_at_features(losses, [], shared)


class _Wide(nn.Module):
    """A shared trunk of sixteen 512 x 512 layers: its Jacobian dominates the step's memory, and
    one layer's rows (what streamed holds at a time) are small next to it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*(nn.Linear(512, 512) for _ in range(16)))
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(4))


def wide_model_peaks() -> tuple[float, float]:
    """Peak memory growth (MiB) of a stored and of a streamed UPGrad step on `_Wide`."""
    exact_rss_accounting()
    model, x = _Wide(), torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    tasks = [f"t{i}" for i in range(4)]
    context = BalanceContext.local(
        shared_params=list(model.layers.parameters()),
        task_params={t: list(h.parameters()) for t, h in zip(tasks, model.heads, strict=True)},
    )

    def step(jacobian: str) -> float:
        balancer = build_balancer(OmegaConf.create({**OmegaConf.load(CONF / "upgrad.yaml"),
                                                   "jacobian": jacobian}), None, tasks)

        def run() -> None:
            features = model.layers(x)
            balancer.backward({t: h(features).square().mean() for t, h in
                               zip(tasks, model.heads, strict=True)}, context)

        def peak() -> float:
            model.zero_grad(set_to_none=True)
            return peak_rss_growth_mib(run)

        run()
        return min(peak() for _ in range(3))

    return step("stored"), step("streamed")


def test_streamed_never_holds_the_task_jacobian():
    """T = 4 tasks on 4M shared parameters: the stored Jacobian alone is 64 MiB; streamed
    needs the update's gradients (16 MiB) and one layer's rows at a time. Measured in a fresh
    interpreter: in a process that has run other tests, the allocator's earlier state adds
    its own tens of MiB to a peak."""
    if not exact_rss_accounting():
        pytest.skip("peak memory is measured with glibc's allocator")
    probe = "from test_balancers_streamed import wide_model_peaks; print(*wide_model_peaks())"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stored, streamed = (float(v) for v in done.stdout.split()[-2:])
    # stored holds the 64 MiB Jacobian on top of the rest, streamed the update's 16 MiB and one
    # layer's rows (4 MiB), far below the Jacobian alone
    assert stored > 64 > 2 * streamed, (stored, streamed)


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
