"""Loss-weighting methods and scalarisers against their definitions and TorchJD 0.18's
scalarisers (oracle for the gradient weights), and each one training through `train`."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl.balancers.base import BalanceContext
from mtl.balancers.cosmos import COSMOS
from mtl.balancers.gls import GLS
from mtl.balancers.gradnorm import GradNorm
from mtl.balancers.gramian import IMTL
from mtl.balancers.imtl_full import IMTLFull
from mtl.balancers.imtl_l import IMTLL
from mtl.balancers.jacobian import gramian
from mtl.balancers.logloss import LogLoss
from mtl.balancers.pbi import PBI
from mtl.balancers.stch import STCH
from mtl.train import train

_context = BalanceContext.local


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


# ----------------------------------------------------------------------------- STCH
@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0])
def test_stch_torchjd_form_matches_torchjd(mu):
    scalarization = pytest.importorskip("torchjd.scalarization")
    preference, reference = [0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.01, 2.0]
    method = STCH(4, mu=mu, form="torchjd", preference=preference, reference=reference)
    oracle = scalarization.STCH(
        mu,
        weights=torch.tensor(preference, dtype=torch.float64),
        reference=torch.tensor(reference, dtype=torch.float64),
    )
    _assert_matches(method.weights(_losses(*LOSSES), _context()), _oracle_weights(oracle, LOSSES))
    uniform = STCH(4, mu=mu, form="torchjd").weights(_losses(*LOSSES), _context())
    _assert_matches(uniform, _oracle_weights(scalarization.STCH(mu), LOSSES))
    assert uniform.sum().item() == pytest.approx(
        0.25
    )  # mean convention: λ = 1/T, weights sum to 1/T


def _step(method: STCH, values: list[float], epoch: int) -> torch.Tensor:
    losses, context = _losses(*values), _context(epoch=epoch)
    method.observe(losses, context)
    return method.weights(losses, context)


def test_stch_libmtl_form_warms_up_records_the_nadir_then_smooths_the_max():
    method = STCH(2, mu=0.5, warmup_epochs=2)
    for epoch in (0, 1):  # warm-up: Σ log L, weights 1/L
        assert torch.allclose(_step(method, [2.0, 0.5], epoch), torch.tensor([0.5, 2.0]))
    assert not method.has_nadir and method.nadir_count == 0
    for values in ([4.0, 1.0], [2.0, 3.0]):  # epoch E_w: still log-loss; its mean is the nadir
        assert torch.allclose(_step(method, values, 2), 1 / torch.tensor(values))
    weights = _step(method, [1.5, 4.0], 3)
    assert method.has_nadir
    assert torch.allclose(method.nadir, torch.tensor([3.0, 2.0], dtype=torch.float64))
    normalised = torch.log(torch.tensor([1.5 / 3.0, 4.0 / 2.0]))
    expected = 2 * torch.softmax(normalised / 0.5, 0) / torch.tensor([1.5, 4.0])
    assert torch.allclose(weights, expected.float(), rtol=1e-6)
    # the worse normalised task (the second, at twice its nadir) gets almost all the weight
    assert weights[1] * 4.0 > 10 * weights[0] * 1.5
    # the nadir stays fixed afterwards
    _step(method, [100.0, 100.0], 7)
    assert torch.allclose(method.nadir, torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_stch_nadir_is_in_the_state_dict():
    method = STCH(2, warmup_epochs=0)
    _step(method, [4.0, 1.0], 0)
    _step(method, [2.0, 3.0], 1)
    restored = STCH(2, warmup_epochs=0)
    restored.load_state_dict(method.state_dict())
    assert restored.has_nadir
    assert torch.equal(restored.nadir, method.nadir)
    assert torch.equal(_step(restored, [1.0, 1.0], 2), _step(method, [1.0, 1.0], 2))


def test_stch_refuses_bad_options():
    with pytest.raises(ValueError, match="balancer.mu"):
        STCH(2, mu=0.0)
    with pytest.raises(ValueError, match="balancer.form"):
        STCH(2, form="max")
    with pytest.raises(ValueError, match="balancer.preference"):
        STCH(2, form="torchjd", preference=[1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------- IMTL
class Toy(nn.Module):
    """A shared layer and three linear heads (three tasks of different scales)."""

    TASKS = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 5)
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in self.TASKS})
        self.x = torch.randn(8, 3)
        self.y = {
            t: torch.randn(8, 1) * s for t, s in zip(self.TASKS, (1.0, 10.0, 0.1), strict=True)
        }

    def features(self) -> torch.Tensor:
        return torch.tanh(self.shared(self.x))

    def losses(self, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.features() if features is None else features
        return {t: ((self.heads[t](features) - self.y[t]) ** 2).mean() for t in self.TASKS}

    def context(self, **kwargs) -> BalanceContext:
        return _context(
            shared_params=list(self.shared.parameters()),
            task_params={t: list(h.parameters()) for t, h in self.heads.items()},
            **kwargs,
        )

    def jacobian(self) -> torch.Tensor:
        shared = list(self.shared.parameters())
        rows = []
        for loss in self.losses().values():
            rows.append(
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]
                )
            )
        return torch.stack(rows)


SCALES = [0.3, -0.2, 1.0]


def test_imtl_l_matches_torchjd_in_the_loss_and_scale_gradients():
    scalarization = pytest.importorskip("torchjd.scalarization")
    ours, oracle = IMTLL(3), scalarization.IMTLL(3)
    with torch.no_grad():
        ours.log_scales.copy_(torch.tensor(SCALES))
        oracle.log_scale.copy_(torch.tensor(SCALES))
    values = [0.7, 2.5, 0.03]
    mine = {t: torch.tensor(v, requires_grad=True) for t, v in zip("abc", values, strict=True)}
    ours.backward(mine, _context())
    theirs = torch.tensor(values, requires_grad=True)
    oracle(theirs).backward()
    assert torch.allclose(torch.stack([v.grad for v in mine.values()]), theirs.grad)
    assert torch.allclose(ours.log_scales.grad, oracle.log_scale.grad)
    # ∂/∂s_t = e^{s_t}·L_t − 1: zero when the scaled loss is 1
    expected = torch.tensor(SCALES).exp() * torch.tensor(values) - 1
    assert torch.allclose(ours.log_scales.grad, expected)


def test_imtl_full_is_imtl_g_on_the_scaled_gradients_with_the_imtl_l_scale_gradient():
    toy = Toy()
    method = IMTLFull(3)
    with torch.no_grad():
        method.scales.log_scales.copy_(torch.tensor(SCALES))
    losses = toy.losses()
    context = toy.context()
    result = method.backward(losses, context)
    scale = torch.tensor(SCALES, dtype=torch.float64).exp()
    jacobian = toy.jacobian().double()
    alpha = IMTL().weights(gramian(scale[:, None] * jacobian), _context())
    assert alpha.sum().item() == pytest.approx(1.0)
    expected_update = (alpha * scale) @ jacobian
    got = torch.cat([p.grad.flatten() for p in toy.shared.parameters()]).double()
    assert torch.allclose(got, expected_update, rtol=1e-5, atol=1e-7)
    # impartial: equal projections onto every unit task gradient (scaling keeps the direction)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    projections = units @ got
    assert torch.allclose(projections, projections.mean().expand(3), rtol=1e-4)
    assert torch.allclose(
        torch.tensor(list(result.weights.values()), dtype=torch.float64), alpha * scale, rtol=1e-5
    )
    # heads: the gradient of their own scaled loss; scales: e^s·L − 1
    fresh = toy.losses()
    for i, task in enumerate(Toy.TASKS):
        own = torch.autograd.grad(
            scale[i].float() * fresh[task], list(toy.heads[task].parameters())
        )
        for p, e in zip(toy.heads[task].parameters(), own, strict=True):
            assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-7)
    values = torch.stack([loss.detach() for loss in fresh.values()])
    assert torch.allclose(method.scales.log_scales.grad, scale.float() * values - 1, rtol=1e-5)


def test_imtl_full_rep_mode_adds_the_scale_gradient_to_the_one_backward():
    toy = Toy()
    method = IMTLFull(3, mode="rep")
    with torch.no_grad():
        method.scales.log_scales.copy_(torch.tensor(SCALES))
    features = toy.features()
    leaf = features.detach().requires_grad_()
    losses = toy.losses(leaf)
    result = method.backward(losses, toy.context(features=[features], head_inputs=[leaf]))
    scale = torch.tensor(SCALES).exp()
    rows = []
    for task in Toy.TASKS:
        feats = toy.features()
        rows.append(torch.autograd.grad(toy.losses(feats)[task], feats)[0].flatten())
    feature_jacobian = torch.stack(rows).double()
    alpha = IMTL().weights(gramian(scale.double()[:, None] * feature_jacobian), _context())
    weights = torch.tensor(list(result.weights.values()))
    assert torch.allclose(weights.double(), alpha * scale.double(), rtol=1e-5)
    fresh = toy.losses()
    expected = torch.autograd.grad(
        sum(w * loss for w, loss in zip(weights, fresh.values(), strict=True)),
        list(toy.shared.parameters()),
    )
    for p, e in zip(toy.shared.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, e, rtol=1e-4, atol=1e-6)
    values = torch.stack([loss.detach() for loss in fresh.values()])
    assert torch.allclose(method.scales.log_scales.grad, scale * values - 1, rtol=1e-5)


def test_imtl_full_combine_weights_the_unscaled_rows():
    method = IMTLFull(3)
    with torch.no_grad():
        method.scales.log_scales.copy_(torch.tensor(SCALES))
    jacobian = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    update, weights = method.combine(jacobian, _losses(1.0, 2.0, 3.0), _context())
    assert torch.allclose(update, weights @ jacobian)
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    assert torch.allclose(units @ update, (units @ update).mean().expand(3))


# ----------------------------------------------------------------------------- GradNorm
def _gradnorm_target_gradient(logits, norms, losses, initial, alpha):
    """∂/∂ξ Σ_t |w_t n_t − c_t| by hand: sign_t·n_t·∂w_t/∂ξ_k, ∂w_t/∂ξ_k = w_t(δ_tk − w_k/T)."""
    t = len(logits)
    w = t * torch.softmax(logits, 0)
    rate = losses / initial
    target = (w * norms).mean() * (rate / rate.mean()) ** alpha
    sign = torch.sign(w * norms - target)
    jac = torch.diag(w) - w[:, None] * w[None, :] / t  # [t, k] = ∂w_t/∂ξ_k
    return (sign * norms) @ jac


def test_gradnorm_first_epoch_is_the_plain_sum_then_the_logits_follow_the_norm_targets():
    method = GradNorm(3, alpha=1.5)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.2, 1.0, -0.5]))
    jacobian = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jacobian[1] *= 10
    norms = jacobian.norm(dim=1)
    for values in ([1.0, 2.0, 4.0], [3.0, 2.0, 2.0]):  # epoch 0: weights 1, no ξ gradient
        losses = _losses(*values)
        method.observe(losses, _context(epoch=0))
        _, weights = method.combine(jacobian, losses, _context(epoch=0))
        assert torch.equal(weights, torch.ones(3, dtype=torch.float64))
        method.write_own_gradients(losses, _context(epoch=0))
        assert method.logits.grad is None
    initial = torch.tensor([2.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(method.initial_sum / method.initial_count, initial)
    losses = _losses(1.0, 1.5, 2.7)
    method.observe(losses, _context(epoch=1))
    update, weights = method.combine(jacobian, losses, _context(epoch=1))
    logits = torch.tensor([0.2, 1.0, -0.5], dtype=torch.float64)
    assert torch.allclose(weights, 3 * torch.softmax(logits, 0))
    assert weights.sum().item() == pytest.approx(3.0)
    assert torch.allclose(update, weights @ jacobian)
    method.write_own_gradients(losses, _context(epoch=1))
    values = torch.tensor([1.0, 1.5, 2.7], dtype=torch.float64)
    expected = _gradnorm_target_gradient(logits, norms, values, initial, 1.5)
    assert torch.allclose(method.logits.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradnorm_weights_converge_to_the_norm_targets():
    """ξ stepped alone (model fixed, so norms and losses fixed): L_grad = Σ_t |w_t n_t − Ḡ r_t^α|
    falls to its floor T·Ḡ·(mean_t r_t^α − 1) (Σ_t G_t = T·Ḡ, but the targets sum to more)."""
    toy = Toy()
    method = GradNorm(3, alpha=1.5)
    optimizer = torch.optim.SGD([method.logits], lr=0.02)
    method.backward(toy.losses(), toy.context(epoch=0))  # records L̄(0)
    with torch.no_grad():  # later losses: task "a" trains slower (larger r) than "b" and "c"
        toy.y["a"] *= 1.3
    norms = toy.jacobian().norm(dim=1).double()
    values = torch.stack([loss.detach() for loss in toy.losses().values()]).double()
    rate = values / (method.initial_sum / method.initial_count)
    rate = rate / rate.mean()
    floor = 3 * ((rate**1.5).mean() - 1)

    def relative_gap() -> float:
        scaled = method.weights(gramian(toy.jacobian()), _context()) * norms
        return float((scaled - scaled.mean() * rate**1.5).abs().sum() / scaled.mean())

    history = []
    for _ in range(300):
        optimizer.zero_grad()
        method.backward(toy.losses(), toy.context(epoch=1))
        optimizer.step()
        history.append(relative_gap())
    assert history[0] > 3  # gradient norms 0.7 to 9.6 at w = 1
    assert all(floor - 1e-9 <= gap < 1.5 * floor for gap in history[-50:])
    weights = method.weights(gramian(toy.jacobian()), _context())
    assert weights.sum().item() == pytest.approx(3.0)
    assert weights.argmin() == norms.argmax()  # the task with the largest gradient is damped
    assert weights.argmax() == rate.argmax()  # the slowest task is pushed


def test_gradnorm_rep_mode_takes_the_norms_on_the_features_and_steps_logits_in_the_backward():
    toy = Toy()
    method = GradNorm(3, mode="rep")
    backward_calls = []

    def rep_step(epoch: int) -> None:
        features = toy.features()
        leaf = features.detach().requires_grad_()
        context = toy.context(
            features=[features],
            head_inputs=[leaf],
            epoch=epoch,
            backward=lambda t: (backward_calls.append(epoch), t.backward()),
        )
        method.logits.grad = None
        method.backward(toy.losses(leaf), context)

    rep_step(0)
    initial = torch.stack([loss.detach() for loss in toy.losses().values()]).double()
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.0, 0.5, 1.0]))
        toy.y["b"] *= 2
    rep_step(1)
    assert backward_calls == [0, 1]  # one framework backward per step, ξ's gradient inside it
    rows = []
    for task in Toy.TASKS:
        feats = toy.features()
        rows.append(torch.autograd.grad(toy.losses(feats)[task], feats)[0].flatten())
    norms = torch.stack(rows).double().norm(dim=1)
    values = torch.stack([loss.detach() for loss in toy.losses().values()]).double()
    logits = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    expected = _gradnorm_target_gradient(logits, norms, values, initial, 1.5)
    assert torch.allclose(method.logits.grad.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- PBI, COSMOS
PREFERENCE = [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("theta", [0.0, 5.0])
def test_pbi_matches_torchjd_and_has_negative_weights(theta):
    scalarization = pytest.importorskip("torchjd.scalarization")
    reference = [0.1, 0.0, 0.0, 1.0]
    method = PBI(4, theta=theta, preference=PREFERENCE, reference=reference)
    weights = method.weights(_losses(*LOSSES), _context())
    oracle = scalarization.PBI(
        theta,
        weights=torch.tensor(PREFERENCE, dtype=torch.float64),
        reference=torch.tensor(reference, dtype=torch.float64),
    )
    _assert_matches(weights, _oracle_weights(oracle, LOSSES))
    if theta == 0:  # the projection onto the preference direction
        unit = torch.tensor(PREFERENCE) / torch.tensor(PREFERENCE).norm()
        assert torch.allclose(weights, unit)
    else:  # losses off the preference ray: the penalty raises some of them
        assert (weights < 0).any()


@pytest.mark.parametrize("lambda_", [0.0, 0.5, 8.0])
def test_cosmos_matches_torchjd_and_has_negative_weights(lambda_):
    scalarization = pytest.importorskip("torchjd.scalarization")
    method = COSMOS(4, lambda_=lambda_, preference=PREFERENCE)
    losses = [0.7, 2.5, 0.03, 0.2]
    weights = method.weights(_losses(*losses), _context())
    oracle = scalarization.COSMOS(lambda_, weights=torch.tensor(PREFERENCE, dtype=torch.float64))
    _assert_matches(weights, _oracle_weights(oracle, losses))
    r, loss = torch.tensor(PREFERENCE), torch.tensor(losses)
    hand = r - lambda_ * (
        r / (r.norm() * loss.norm()) - (r @ loss) * loss / (r.norm() * loss.norm() ** 3)
    )
    assert torch.allclose(weights, hand, rtol=1e-5)
    assert (weights < 0).any() == (lambda_ == 8.0)


@pytest.mark.parametrize("method", [PBI, COSMOS])
def test_dirichlet_preference_is_drawn_per_step_from_the_seeded_generator(method):
    scalariser = method(3, preference="dirichlet")
    draws = torch.stack([scalariser.preference(_context(step=k, seed=7)) for k in range(2000)])
    assert torch.allclose(draws.sum(1), torch.ones(2000, dtype=torch.float64))
    assert (draws > 0).all()
    fifth = method(3, preference="dirichlet").preference(_context(step=5, seed=7))
    assert torch.equal(draws[5], fifth)
    assert not torch.equal(draws[5], draws[6])
    # Dirichlet(1, 1, 1): each coordinate has mean 1/3 and variance (1/3)(2/3)/4 = 1/18
    assert torch.allclose(draws.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    assert torch.allclose(draws.var(0), torch.full((3,), 1 / 18, dtype=torch.float64), atol=0.01)
    uniform = method(3).preference(_context())
    assert torch.equal(uniform, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("preference", ["random", [1.0, 2.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
def test_bad_preferences_are_refused(preference):
    with pytest.raises(ValueError, match="balancer.preference"):
        PBI(3, preference=preference)


def test_gradnorm_under_flat_regions_steps_the_logits_from_the_plain_gradient_norms():
    from mtl.balancers.flat import FlatRegions

    toy = Toy()
    method = GradNorm(3)
    flat = FlatRegions(method, rho=0.5)

    def context(epoch: int) -> BalanceContext:
        return toy.context(epoch=epoch, recompute_losses=lambda tasks=None: toy.losses(), model=toy)

    flat.backward(toy.losses(), context(0))
    assert method.logits.grad is None
    initial = torch.stack([loss.detach() for loss in toy.losses().values()]).double()
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.0, 0.5, 1.0]))
    flat.backward(toy.losses(), context(1))
    values = torch.stack([loss.detach() for loss in toy.losses().values()]).double()
    logits = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    norms = toy.jacobian().double().norm(dim=1)
    expected = _gradnorm_target_gradient(logits, norms, values, initial, 1.5)
    assert torch.allclose(method.logits.grad.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- through train.py
SHORT = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
]


@pytest.mark.parametrize(
    "overrides",
    [
        ["balancer=logloss"],
        ["balancer=gls"],
        ["balancer=stch", "balancer.form=torchjd"],
        ["balancer=imtl_l"],
        ["balancer=imtl_full"],
        ["balancer=imtl_full", "balancer.mode=rep"],
        ["balancer=gradnorm", "balancer.mode=rep", "trainer.max_epochs=2"],
        ["balancer=gradnorm", "flat=sam", "trainer.max_epochs=2"],
        ["balancer=imtl_full", "flat=sam"],
        ["balancer=pbi", "balancer.preference=dirichlet"],
        ["balancer=cosmos"],
    ],
    ids=lambda o: "+".join(x.split("=")[1] for x in o),
)
def test_trains_through_train_py(make_cfg, overrides):
    scores = train(make_cfg(*SHORT, *overrides))
    assert math.isfinite(scores["val/loss"])


TWO_TASKS = ["data.tasks=[semseg,depth]", "trainer.log_every_n_steps=1"]


def _trajectory(run: Path, tasks: list[str]) -> list[dict]:
    """Per training step of the run's CSV log: epoch, and per task its logged (unweighted)
    loss, the weight the balancer reported and, when logged, its gradient norm."""
    (path,) = run.rglob("metrics.csv")
    rows: dict[int, dict] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            merged = rows.setdefault(int(row["step"]), {})
            merged.update({k: v for k, v in row.items() if v != ""})
    steps = []
    for _, row in sorted(rows.items()):
        if f"balancer/{tasks[0]}/weight" not in row:
            continue
        step = {"epoch": int(float(row["epoch"]))}
        for key, name in (("loss", "train/{}/loss"), ("weight", "balancer/{}/weight")):
            step[key] = torch.tensor([float(row[name.format(t)]) for t in tasks])
        if f"grad/{tasks[0]}/norm" in row:
            step["norm"] = torch.tensor([float(row[f"grad/{t}/norm"]) for t in tasks])
        steps.append(step)
    return steps


def test_stch_weights_follow_warm_up_then_nadir_in_training(make_cfg, tmp_path):
    """Epochs 0–1 (warm-up and nadir epoch, E_w = 1): weights 1/L; epoch 2: T·softmax(log(L/z)/μ)/L
    with z the mean loss of epoch 1, all read back from the run's log."""
    cfg = make_cfg(
        "balancer=stch",
        "balancer.warmup_epochs=1",
        "balancer.mu=0.5",
        *TWO_TASKS,
        "trainer.max_epochs=3",
        *SHORT[1:],
    )
    train(cfg)
    tasks = list(cfg.data.tasks)
    scale = torch.tensor([cfg.data.loss_weights[t] for t in tasks])
    steps = _trajectory(Path(cfg.paths.output_dir), tasks)
    assert [s["epoch"] for s in steps] == [0, 0, 1, 1, 2, 2]
    for s in steps[:4]:
        assert torch.allclose(s["weight"], 1 / (scale * s["loss"]), rtol=1e-4)
    nadir = scale * torch.stack([s["loss"] for s in steps[2:4]]).mean(0)
    for s in steps[4:]:
        loss = scale * s["loss"]
        expected = 2 * torch.softmax(torch.log(loss / nadir) / 0.5, 0) / loss
        assert torch.allclose(s["weight"], expected, rtol=1e-4)
        assert not torch.allclose(s["weight"], 1 / loss, rtol=1e-2)  # the phase did change


def test_gradnorm_weights_follow_the_norm_targets_in_training(make_cfg):
    """Epoch 0: weights 1. Epoch 1: every plain SGD step moves ξ = log(w/T) by −lr·∂L_grad/∂ξ,
    computed here from the logged gradient norms, losses and the epoch-0 mean losses."""
    lr = 0.05
    cfg = make_cfg(
        "balancer=gradnorm",
        "optim=sgd",
        f"optim.optimizer.lr={lr}",
        "optim.optimizer.momentum=0",
        "optim.optimizer.weight_decay=0",
        "optim.scheduler=null",
        "diagnostics_every_n_steps=1",
        *TWO_TASKS,
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=4",
        *SHORT[2:],
    )
    train(cfg)
    tasks = list(cfg.data.tasks)
    scale = torch.tensor([cfg.data.loss_weights[t] for t in tasks])
    steps = _trajectory(Path(cfg.paths.output_dir), tasks)
    assert [s["epoch"] for s in steps] == [0] * 4 + [1] * 4
    for s in steps[:5]:  # ξ moves only after the first GradNorm step
        assert torch.allclose(s["weight"], torch.ones(2))
    initial = torch.stack([scale * s["loss"] for s in steps[:4]]).mean(0).double()
    for now, after in zip(steps[4:-1], steps[5:], strict=True):
        logits = torch.log(now["weight"].double() / 2)
        grad = _gradnorm_target_gradient(
            logits, now["norm"].double(), (scale * now["loss"]).double(), initial, 1.5
        )
        expected = 2 * torch.softmax(logits - lr * grad, 0)
        assert torch.allclose(after["weight"].double(), expected, rtol=1e-4)
    assert not torch.allclose(steps[-1]["weight"], torch.ones(2), atol=1e-3)
    assert steps[-1]["weight"].sum().item() == pytest.approx(2.0, rel=1e-5)


# ----------------------------------------------------------------------------- DDP
@pytest.mark.parametrize(
    ("overrides", "epochs"),
    [
        (["balancer=stch", "balancer.warmup_epochs=0"], 2),  # nadir epoch, then STCH
        (["balancer=gradnorm", "balancer.mode=rep"], 2),  # initial losses, then GradNorm
    ],
    ids=["stch", "gradnorm-rep"],
)
def test_two_processes_equal_one_process_with_the_same_balancer_state(
    make_cfg, quiet_trainer, overrides, epochs
):
    """State from all-reduced losses and norms (STCH's nadir, GradNorm's initial losses and ξ)
    is that of one process on the global batch, and so is the model."""
    from test_ddp import DETERMINISTIC, EXACT_TASKS, _assert_same_training

    cfg = make_cfg(EXACT_TASKS, *DETERMINISTIC, *overrides, "trainer=ddp_cpu")
    single = _fit_epochs(quiet_trainer, cfg, 1, epochs)
    double = _fit_epochs(quiet_trainer, cfg, 2, epochs)
    balancer = {k: v for k, v in single.items() if k.startswith("balancer.")}
    assert balancer
    for name, value in balancer.items():
        assert torch.allclose(double[name].double(), value.double(), rtol=1e-4, atol=1e-6), name
    if "balancer.has_nadir" in balancer:
        assert balancer["balancer.has_nadir"] and balancer["balancer.nadir"].min() > 0
    if "balancer.logits" in balancer:
        assert balancer["balancer.active"] and balancer["balancer.logits"].std() > 0
    model = {k[len("model.") :]: v for k, v in single.items() if k.startswith("model.")}
    _assert_same_training(
        cfg,
        model,
        {k[len("model.") :]: double[k] for k in single if k in double and k.startswith("model.")},
    )


def _fit_epochs(quiet_trainer, cfg, devices: int, epochs: int) -> dict[str, torch.Tensor]:
    """The module's state after `epochs` epochs of the same 2 batches (sequential sampling)."""
    import lightning as L

    from mtl.train import build_datamodule, build_module

    L.seed_everything(cfg.seed)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    trainer = quiet_trainer(
        cfg, devices, overfit_batches=2, max_epochs=epochs, num_sanity_val_steps=0,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
