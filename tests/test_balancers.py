"""Every balancer against its definition on small hand-made gradients and toy models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl.balancers.base import BalanceContext
from mtl.balancers.flat import FlatRegions
from mtl.balancers.gramian import (
    IMTL,
    MGDA,
    AlignedMTL,
    CAGrad,
    PCGrad,
    UPGrad,
)
from mtl.balancers.jacobian import gramian
from mtl.balancers.weighting import DWA, FAMO, Equal, RandomLossWeighting, Uncertainty
from mtl.models.backbone import Backbone
from mtl.models.decoders import HRNetDecoder
from mtl.models.multitask import MultiTaskModel

_context = BalanceContext.local


def _update(method, jacobian: torch.Tensor, step: int = 0) -> torch.Tensor:
    weights = method.weights(gramian(jacobian), _context(step=step))
    return weights @ jacobian.double()


def _random_jacobian(tasks: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(
        tasks, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


# ----------------------------------------------------------------------------- PCGrad
def test_pcgrad_two_dimensional_conflict():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    update = _update(PCGrad(), torch.stack([g1, g2]))
    projected_1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # (0.5, 0.5), orthogonal to g2
    projected_2 = g2 - (g2 @ g1) / (g1 @ g1) * g1  # (0, 1), orthogonal to g1
    assert projected_1 @ g2 == 0 and projected_2 @ g1 == 0
    assert torch.allclose(update, (projected_1 + projected_2).double())
    assert torch.allclose(_update(PCGrad(reduction="mean"), torch.stack([g1, g2])), update / 2)


def _pcgrad_on_vectors(jacobian: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad written directly on the gradient vectors."""
    grads = list(jacobian)
    projected = []
    for i, g in enumerate(grads):
        g = g.clone()
        for j in torch.randperm(len(grads), generator=generator).tolist():
            if j != i and g @ grads[j] < 0:
                g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcgrad_matches_the_vector_definition_with_the_same_random_order(seed):
    jacobian = _random_jacobian(5, 7, seed)
    context = _context(step=3, seed=seed)
    expected = _pcgrad_on_vectors(jacobian, context.generator())
    assert torch.allclose(PCGrad().weights(gramian(jacobian), context) @ jacobian, expected)


def test_pcgrad_without_conflict_is_the_plain_sum():
    jacobian = torch.tensor([[1.0, 0.2], [0.5, 1.0], [0.3, 0.3]], dtype=torch.float64)
    assert torch.allclose(_update(PCGrad(), jacobian), jacobian.sum(0))


# ----------------------------------------------------------------------------- MGDA, CAGrad
def test_mgda_two_tasks_closed_form():
    jacobian = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0]], dtype=torch.float64)
    g = gramian(jacobian)
    w1 = ((g[1, 1] - g[0, 1]) / (g[0, 0] + g[1, 1] - 2 * g[0, 1])).clamp(0, 1)
    weights = MGDA().weights(g, _context())
    assert torch.allclose(weights, torch.stack([w1, 1 - w1]), atol=1e-7)


def test_mgda_picks_the_shorter_gradient_when_it_is_in_the_hull_corner():
    jacobian = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(
        MGDA().weights(gramian(jacobian), _context()),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        atol=1e-7,
    )


def test_cagrad_with_zero_radius_is_the_mean():
    jacobian = _random_jacobian(4, 6, 0)
    assert torch.allclose(_update(CAGrad(c=0.0), jacobian), jacobian.mean(0), atol=1e-9)


def test_cagrad_improves_the_worst_task_over_the_mean():
    jacobian = torch.tensor([[1.0, 0.1], [-0.6, 1.0]], dtype=torch.float64)
    update = _update(CAGrad(c=0.8, rescale=False), jacobian)
    mean = jacobian.mean(0)
    assert (jacobian @ update).min() > (jacobian @ mean).min()
    assert (update - mean).norm() <= 0.8 * mean.norm() + 1e-9  # stays in the ball around g0


# ------------------------------------------ IMTL, Aligned, UPGrad (Nash: tests/test_nash.py)
def test_imtl_update_has_equal_projections_on_every_unit_gradient():
    jacobian = _random_jacobian(4, 9, 1)
    weights = IMTL().weights(gramian(jacobian), _context())
    update = weights @ jacobian
    projections = jacobian @ update / jacobian.norm(dim=1)
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-9)
    assert torch.allclose(projections, projections[0].expand(4), rtol=1e-7)


def test_aligned_mtl_balances_singular_values_to_the_smallest():
    jacobian = _random_jacobian(3, 10, 3) * torch.tensor([[5.0], [1.0], [0.2]], dtype=torch.float64)
    g = gramian(jacobian)
    weights = AlignedMTL().weights(g, _context())
    eigenvalues, vectors = torch.linalg.eigh(g)
    balance = eigenvalues.min().sqrt() * (vectors / eigenvalues.sqrt()) @ vectors.T
    singular_values = torch.linalg.svdvals(balance @ jacobian)
    assert torch.allclose(singular_values, singular_values[-1].expand(3), rtol=1e-7)
    assert torch.allclose(singular_values[-1], torch.linalg.svdvals(jacobian)[-1])
    assert torch.allclose(weights, balance.sum(0))


def test_upgrad_result_conflicts_with_no_task():
    jacobian = torch.tensor(
        [[1.0, 0.0, 0.0], [-0.9, 0.5, 0.0], [-0.5, -0.8, 0.3]], dtype=torch.float64
    )
    update = _update(UPGrad(), jacobian)
    assert (jacobian @ update >= -1e-9).all()
    assert (jacobian.sum(0) @ jacobian.T < 0).any()  # the plain sum would conflict


def test_upgrad_is_the_mean_when_nothing_conflicts():
    jacobian = torch.tensor([[1.0, 0.2], [0.4, 1.0]], dtype=torch.float64)
    assert torch.allclose(_update(UPGrad(), jacobian), jacobian.mean(0), atol=1e-9)


# ----------------------------------------------------------------------------- loss weighting
def _losses(*values: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.tensor(v) for i, v in enumerate(values)}


def test_uncertainty_log_variances_learn_the_loss_scale():
    method = Uncertainty(num_tasks=2)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    losses = _losses(4.0, 0.25)
    for _ in range(300):
        optimizer.zero_grad()
        method.backward(losses, _context())
        optimizer.step()
    # the optimum of ½e^{-s}L + ½s is s = log L
    assert torch.allclose(
        method.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]), atol=1e-3
    )


def test_dwa_uses_the_loss_ratios_of_the_last_two_epochs():
    method = DWA(num_tasks=2, temperature=2.0)
    for epoch, values in enumerate([(1.0, 1.0), (2.0, 2.0), (1.0, 1.5)]):
        for _ in range(2):
            context = _context(epoch=epoch)
            method.observe(_losses(*values), context)
            weights = method.weights(_losses(*values), context)
        if epoch < 2:
            assert torch.equal(weights, torch.ones(2))
    method.observe(_losses(9.0, 9.0), _context(epoch=3))
    ratios = torch.tensor([1.0 / 2.0, 1.5 / 2.0])
    expected = 2 * torch.softmax(ratios / 2.0, dim=0)
    assert torch.allclose(method.weights(_losses(9.0, 9.0), _context(epoch=3)), expected)


def test_famo_moves_weight_to_the_task_whose_loss_falls_slowest():
    method = FAMO(num_tasks=2)
    for step in range(30):
        losses = _losses(1.0 * 0.9**step, 1.0)  # task 0 falls, task 1 does not
        method.observe(losses, _context(step=step))
    z = torch.softmax(method.logits, dim=0)
    assert z[1] > 0.6 > 0.4 > z[0]


def test_famo_weights_are_the_gradient_of_its_log_objective():
    method = FAMO(num_tasks=3)
    method.logits.copy_(torch.tensor([0.2, -0.1, 0.5]))
    losses = {k: v.requires_grad_(True) for k, v in _losses(0.5, 2.0, 1.0).items()}
    method.observe(losses, _context())
    weights = method.weights(losses, _context())
    stacked = torch.stack(list(losses.values()))
    z = torch.softmax(method.logits, dim=0)
    objective = (z * stacked.log()).sum() / (z / stacked).sum().detach()
    grads = torch.autograd.grad(objective, list(losses.values()))
    assert torch.allclose(weights, torch.stack(grads))


def test_rlw_draws_the_same_weights_for_the_same_seed_and_step():
    method = RandomLossWeighting()
    a = method.weights(_losses(1.0, 1.0, 1.0), _context(step=5, seed=1))
    b = method.weights(_losses(2.0, 3.0, 4.0), _context(step=5, seed=1))
    c = method.weights(_losses(1.0, 1.0, 1.0), _context(step=6, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert math.isclose(a.sum().item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("method", [Equal, RandomLossWeighting])
def test_loss_weighting_refuses_rep_mode(method):
    with pytest.raises(ValueError, match="balancer.mode='rep'.*gradient methods"):
        method(mode="rep")


def test_gramian_matches_the_float64_product():
    torch.manual_seed(0)
    # a million columns: a plain float32 product is off by about 3e-5 here
    jacobian = torch.randn(3, 250 * 4096 + 123) * torch.tensor([[1.0], [1e-3], [50.0]])
    jacobian[1] = jacobian[0] * -0.5 + 1e-4 * jacobian[1]  # nearly opposed rows
    exact = jacobian.double() @ jacobian.double().T
    got = gramian(jacobian)
    assert got.dtype == torch.float64
    assert torch.allclose(got, exact, rtol=1e-6, atol=1e-9 * exact.abs().max().item())


# ----------------------------------------------------------------------------- toy model
class Toy(nn.Module):
    """Shared linear layer and one linear head per task, with a BatchNorm in between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
        self.x = torch.randn(8, 3)
        self.y = {"a": torch.randn(8, 1), "b": torch.randn(8, 1)}

    def features(self) -> torch.Tensor:
        return self.norm(self.shared(self.x))

    def losses(self, tasks=None, features=None) -> dict[str, torch.Tensor]:
        features = self.features() if features is None else features
        return {t: ((self.heads[t](features) - self.y[t]) ** 2).mean() for t in tasks or ("a", "b")}

    def context(self, features=None, head_inputs=None) -> BalanceContext:
        return _context(
            shared_params=list(self.shared.parameters()) + list(self.norm.parameters()),
            task_params={t: list(h.parameters()) for t, h in self.heads.items()},
            recompute_losses=lambda tasks=None: self.losses(tasks),
            features=features,
            head_inputs=head_inputs,
            model=self,
        )


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def test_param_mode_writes_the_weighted_sum_to_shared_and_own_gradients_to_heads():
    toy = Toy()
    context = toy.context()
    result = MGDA().backward(toy.losses(), context)
    weights = torch.tensor([result.weights["a"], result.weights["b"]])
    got = _grads(context.shared_params)
    losses = toy.losses()
    expected = torch.autograd.grad(
        weights[0] * losses["a"] + weights[1] * losses["b"], context.shared_params
    )
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-6)
    own = torch.autograd.grad(toy.losses()["a"], list(toy.heads["a"].parameters()))
    for p, e in zip(toy.heads["a"].parameters(), own, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)


def test_rep_mode_weights_from_feature_gradients_and_one_backward():
    toy = Toy()
    features = toy.features()
    leaf = features.detach().requires_grad_()
    losses = toy.losses(features=leaf)
    context = toy.context(features=[features], head_inputs=[leaf])
    result = MGDA(mode="rep").backward(losses, context)
    weights = torch.tensor([result.weights["a"], result.weights["b"]])
    # the weights are MGDA's on the Gramian of the feature gradients
    rows = []
    for task in ("a", "b"):
        feats = toy.features()
        rows.append(
            torch.autograd.grad(toy.losses([task], features=feats)[task], feats)[0].flatten()
        )
    feature_grads = torch.stack(rows)
    assert torch.allclose(
        weights.double(), MGDA().weights(gramian(feature_grads), _context()), atol=1e-6
    )
    fresh = toy.losses()
    expected = torch.autograd.grad(
        weights[0] * fresh["a"] + weights[1] * fresh["b"], context.shared_params
    )
    for p, e in zip(context.shared_params, expected, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)
    own = torch.autograd.grad(toy.losses()["b"], list(toy.heads["b"].parameters()))
    for p, e in zip(toy.heads["b"].parameters(), own, strict=True):
        assert torch.allclose(p.grad, e, atol=1e-6)


def test_rep_mode_on_a_multi_scale_backbone_gives_the_gradient_of_the_weighted_loss():
    """Each scale of a ResNet is computed from the previous one: the update must still be
    exactly the gradient of Σ w_i L_i, each stage's contribution counted once."""
    torch.manual_seed(0)
    model = MultiTaskModel(
        Backbone("resnet18", out_indices=(1, 2, 3)), HRNetDecoder, {"a": 3, "b": 1}
    )
    images = torch.randn(2, 3, 32, 32)
    targets = {"a": torch.randn(2, 3, 32, 32), "b": torch.randn(2, 1, 32, 32)}

    def losses_of(decoded):
        return {t: ((decoded.preds[t] - targets[t]) ** 2).mean() for t in ("a", "b")}

    decoded = model.decode(images, detach_features=True)
    context = _context(
        shared_params=model.shared_parameters(),
        task_params=model.task_parameters(),
        features=decoded.features,
        head_inputs=decoded.head_inputs,
        model=model,
    )
    result = PCGrad(mode="rep").backward(losses_of(decoded), context)
    fresh = losses_of(model.decode(images))
    weighted = sum(result.weights[t] * fresh[t] for t in ("a", "b"))
    expected = torch.autograd.grad(weighted, model.shared_parameters())
    for p, e in zip(model.shared_parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-7)


def test_rep_mode_without_detached_head_inputs_is_refused():
    toy = Toy()
    features = toy.features()
    with pytest.raises(ValueError, match="detach_features=True"):
        MGDA(mode="rep").backward(toy.losses(features=features), toy.context([features]))


# ----------------------------------------------------------------------------- SAM-MTL
@pytest.mark.parametrize("aggregator", ["equal", "pcgrad"])
def test_flat_regions_match_a_hand_computation_and_restore_weights_bit_for_bit(aggregator):
    torch.manual_seed(0)
    theta = nn.Parameter(torch.tensor([0.5, -1.0]))
    heads = {"a": nn.Parameter(torch.tensor([2.0])), "b": nn.Parameter(torch.tensor([-0.5]))}
    centres = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([-1.0, -3.0])}  # conflicting
    scales = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0, 0.5])}

    def losses(tasks=None):
        # L_i = ½ Σ A_i (θ − c_i)² + ½ h_i² : a quadratic with known gradients
        return {
            t: 0.5 * (scales[t] * (theta - centres[t]) ** 2).sum() + 0.5 * heads[t].pow(2).sum()
            for t in tasks or ("a", "b")
        }

    before = (theta.detach().clone(), {t: h.detach().clone() for t, h in heads.items()})
    rho = 0.3
    context = _context(
        shared_params=[theta],
        task_params={t: [h] for t, h in heads.items()},
        recompute_losses=losses,
    )
    method = Equal() if aggregator == "equal" else PCGrad()
    FlatRegions(method, rho=rho).backward(losses(), context)

    plain, flat, head_expected = [], [], {}
    for t in ("a", "b"):
        g = torch.cat([scales[t] * (before[0] - centres[t]), before[1][t]])  # [shared, head]
        eps = rho * g / g.norm()
        g_sam = torch.cat([scales[t] * (before[0] + eps[:2] - centres[t]), before[1][t] + eps[2:]])
        plain.append(g[:2])
        flat.append(g_sam[:2] - g[:2])
        head_expected[t] = g_sam[2:]
    if aggregator == "equal":
        shared_expected = sum(plain) + sum(flat)
    else:  # the aggregator applied to each part separately, not to the SAM gradients
        plain_j, flat_j = torch.stack(plain).double(), torch.stack(flat).double()
        shared_expected = (
            _pcgrad_on_vectors(plain_j, context.generator())
            + _pcgrad_on_vectors(flat_j, context.generator())
        ).float()
        assert not torch.allclose(
            shared_expected, _pcgrad_on_vectors(plain_j + flat_j, context.generator()).float()
        )
    assert torch.allclose(theta.grad, shared_expected, atol=1e-6)
    for t in ("a", "b"):
        assert torch.allclose(heads[t].grad, head_expected[t], atol=1e-6)
    assert torch.equal(theta.detach(), before[0])
    assert all(torch.equal(heads[t].detach(), before[1][t]) for t in heads)


def test_flat_regions_keep_batchnorm_statistics_and_use_the_aggregator_on_each_part():
    toy, reference = Toy(), Toy()
    params = [p.detach().clone() for p in toy.parameters()]
    FlatRegions(PCGrad(), rho=0.1, adaptive=True).backward(toy.losses(), toy.context())
    reference.losses()  # only the unperturbed forward may move the running statistics
    for name, buffer in reference.norm.named_buffers():
        assert torch.equal(getattr(toy.norm, name), buffer), name
    assert all(torch.equal(p, q) for p, q in zip(toy.parameters(), params, strict=True))


def test_flat_regions_refuse_rep_mode():
    with pytest.raises(ValueError, match="balancer.mode=param"):
        FlatRegions(PCGrad(mode="rep"))
