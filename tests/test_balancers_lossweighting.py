"""Loss-weighting methods and scalarisers against their definitions and TorchJD 0.18's
scalarisers (oracle for the gradient weights), and each one training through `train`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl.balancers.base import BalanceContext
from mtl.balancers.gls import GLS
from mtl.balancers.logloss import LogLoss
from mtl.train import train


def _context(step: int = 0, seed: int = 0, epoch: int = 0, **kwargs) -> BalanceContext:
    defaults = dict(
        shared_params=[],
        task_params={},
        backward=lambda t: t.backward(),
        recompute_losses=lambda tasks=None: {},
        all_reduce_mean=lambda t: t,
    )
    return BalanceContext(**{**defaults, **kwargs}, step=step, seed=seed, epoch=epoch)


def _losses(*values: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.tensor(v) for i, v in enumerate(values)}


def _oracle_weights(scalarizer, values: list[float]) -> torch.Tensor:
    """∂/∂L of a TorchJD scalariser at L (float64)."""
    leaf = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(scalarizer(leaf), leaf)
    return grad


def _assert_matches(weights: torch.Tensor, oracle: torch.Tensor) -> None:
    """Same direction (cosine ≥ 0.999) and same scale (the same convention)."""
    weights, oracle = weights.double(), oracle.double()
    assert torch.nn.functional.cosine_similarity(weights, oracle, dim=0) >= 0.999
    assert torch.allclose(weights, oracle, rtol=1e-5, atol=1e-8), (weights, oracle)


LOSSES = [0.7, 2.5, 0.03, 11.0]


# ----------------------------------------------------------------------------- log-loss
def test_logloss_weights_are_the_inverse_losses():
    weights = LogLoss(eps=1e-3).weights(_losses(*LOSSES), _context())
    expected = torch.tensor([1 / (v + 1e-3) for v in LOSSES])
    assert torch.allclose(weights, expected, rtol=1e-6)


def test_logloss_update_is_invariant_to_rescaling_one_loss():
    """∇log(c·L) = ∇log L: multiplying a task's loss by c leaves the update unchanged."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def update(scale: float) -> torch.Tensor:
        model.zero_grad()
        out = model(x)
        losses = {
            "a": ((out[:, 0] - y[:, 0]) ** 2).mean(),
            "b": scale * (out[:, 1] - y[:, 1]).abs().mean(),
        }
        LogLoss(eps=0.0).backward(losses, _context())
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.allclose(update(1.0), update(1000.0), rtol=1e-4, atol=1e-7)


def test_logloss_refuses_a_negative_eps():
    with pytest.raises(ValueError, match="balancer.eps"):
        LogLoss(eps=-1.0)


# ----------------------------------------------------------------------------- GLS
def test_gls_weights_match_torchjd_geometric_mean():
    scalarization = pytest.importorskip("torchjd.scalarization")
    weights = GLS().weights(_losses(*LOSSES), _context())
    _assert_matches(weights, _oracle_weights(scalarization.GeometricMean(), LOSSES))
    geometric_mean = math.prod(LOSSES) ** (1 / len(LOSSES))
    expected = torch.tensor([geometric_mean / (len(LOSSES) * v) for v in LOSSES])
    assert torch.allclose(weights, expected, rtol=1e-6)


def test_gls_is_finite_where_the_product_underflows():
    losses = _losses(*([1e-30] * 12))  # Π L = 1e-360 underflows float64
    weights = GLS().weights(losses, _context())
    assert torch.isfinite(weights).all()
    assert torch.allclose(weights, torch.full((12,), 1 / 12), rtol=1e-5)


# ----------------------------------------------------------------------------- through train.py
SHORT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
]


@pytest.mark.parametrize("overrides", [["balancer=logloss"], ["balancer=gls"]], ids=lambda o: o[0])
def test_trains_through_train_py(make_cfg, overrides):
    scores = train(make_cfg(*overrides, *SHORT))
    assert math.isfinite(scores["val/loss"])
