"""Nash-MTL: the bargaining equation α_i (Gα)_i = 1 solved exactly, the reference's scale
(solve on G, shared update clipped to `max_norm`), and Gramians without a solution."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy.optimize import minimize, root

from mtl.balancers import build_balancer
from mtl.balancers.base import BalanceContext
from mtl.balancers.gramian import NashMTL
from mtl.balancers.jacobian import gramian
from mtl.balancers.nash import NashSolveError, bargaining_residual, nash_weights

CONF = Path(__file__).resolve().parents[1] / "conf"


_context = BalanceContext.local


def _conflicting_jacobian(tasks: int, seed: int, dim: int = 32) -> torch.Tensor:
    """Random rows, except task 1 ≈ −0.8 × task 0: one strongly conflicting pair."""
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(tasks, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(dim, generator=generator, dtype=torch.float64)
    jacobian[1] = -0.8 * jacobian[0] + 0.3 * noise
    return jacobian


# Seeds on which a least-squares solve on log α from α = 1 stalls at α_1 → 0, residual ≈ 1.
CONFLICTS = [(3, 2), (5, 1), (5, 3)]


@pytest.mark.parametrize("tasks,seed", CONFLICTS)
def test_strong_conflict_solves_the_equation_on_the_unnormalised_gramian(tasks, seed):
    jacobian = _conflicting_jacobian(tasks, seed)
    g = gramian(jacobian)
    alpha = NashMTL(max_norm=None).weights(g, _context())
    assert (alpha > 0).all()
    assert (alpha * (g @ alpha) - 1).abs().max() < 1e-6
    # Σ α_i (Gα)_i = αᵀGα = T: the update has norm √T
    assert math.isclose((alpha @ jacobian).norm().item(), math.sqrt(tasks), rel_tol=1e-9)


@pytest.mark.parametrize("tasks,seed", CONFLICTS)
def test_strong_conflict_normalised_variant_solves_its_own_equation(tasks, seed):
    g = gramian(_conflicting_jacobian(tasks, seed))
    alpha = NashMTL(max_norm=None, normalize=True).weights(g, _context())
    normalised = g / torch.linalg.matrix_norm(g)
    assert (alpha * (normalised @ alpha) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("tasks,seed", CONFLICTS)
def test_strong_conflict_update_decreases_every_task(tasks, seed):
    """The bargaining update has directional derivative g_iᵀd = 1/α_i > 0 for every task."""
    jacobian = _conflicting_jacobian(tasks, seed)
    update = NashMTL().weights(gramian(jacobian), _context()) @ jacobian
    derivatives = jacobian @ update
    assert (derivatives > 0).all(), derivatives
    assert jacobian[0] @ jacobian[1] < 0


def test_strong_conflict_on_many_seeds():
    for tasks in (3, 5):
        for seed in range(20):
            jacobian = _conflicting_jacobian(tasks, seed)
            g = gramian(jacobian)
            alpha = NashMTL(max_norm=None).weights(g, _context())
            assert (alpha * (g @ alpha) - 1).abs().max() < 1e-6, (tasks, seed)
            assert (jacobian @ (alpha @ jacobian) > 0).all(), (tasks, seed)


def _independent_solve(g: np.ndarray) -> np.ndarray:
    """Minimise the convex ½αᵀGα − Σ log α over y = log α (unconstrained) with scipy's exact
    trust-region method from α = 1, then polish with MINPACK's root finder on its gradient
    α ⊙ Gα − 1: another parametrisation and other algorithms than `nash_weights`."""

    def fun(y):
        a = np.exp(y)
        return 0.5 * a @ g @ a - y.sum()

    def jac(y):
        a = np.exp(y)
        return a * (g @ a) - 1.0

    def hess(y):
        a = np.exp(y)
        return np.diag(a * (g @ a)) + a[:, None] * g * a[None, :]

    start = minimize(fun, np.zeros(g.shape[0]), jac=jac, hess=hess, method="trust-exact").x
    return np.exp(root(jac, start, jac=hess, method="hybr", options={"xtol": 1e-15}).x)


@pytest.mark.parametrize("seed", range(10))
def test_weights_agree_with_an_independent_solve_of_the_convex_objective(seed):
    rng = np.random.default_rng(seed)
    tasks = 2 + seed % 5
    jacobian = rng.standard_normal((tasks, 3 * tasks)) * rng.uniform(0.1, 10, size=(tasks, 1))
    if seed % 2:
        jacobian[1] = -0.9 * jacobian[0] + 0.2 * jacobian[1]
    g = jacobian @ jacobian.T
    expected = _independent_solve(g)
    assert bargaining_residual(g, expected) < 1e-12  # the independent solve did converge
    np.testing.assert_allclose(nash_weights(g), expected, rtol=1e-10)


def test_default_scale_is_the_reference_clipped_to_max_norm():
    """Reference: α on the unnormalised G, shared update clipped to norm 1.0."""
    jacobian = 100 * _conflicting_jacobian(3, 2)
    g = gramian(jacobian)
    exact = torch.from_numpy(nash_weights(g.numpy()))
    default = NashMTL().weights(g, _context())
    assert math.isclose((default @ jacobian).norm().item(), 1.0, rel_tol=1e-9)
    assert torch.allclose(default, exact / math.sqrt(3), rtol=1e-12)
    # a cap above √T leaves the exact solution alone
    assert torch.allclose(NashMTL(max_norm=5.0).weights(g, _context()), exact, rtol=1e-12)
    # the normalised variant: √|G|_F times the weights, step √(T |G|_F)
    normalised = NashMTL(max_norm=None, normalize=True).weights(g, _context())
    assert torch.allclose(normalised, exact * torch.linalg.matrix_norm(g).sqrt(), rtol=1e-12)


def test_param_mode_shared_gradient_is_the_reference_clipped_update():
    """Against the reference procedure written out: backward of Σ α_i L_i with α solving
    α_i (Gα)_i = 1 on the unnormalised G, then ``clip_grad_norm_`` of the shared parameters
    to 1.0; each head keeps its own task's gradient (this framework's convention)."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 6)
    heads = {t: torch.nn.Linear(6, 1) for t in ("a", "b", "c")}
    x, y = torch.randn(16, 4), {t: torch.randn(16, 1) for t in heads}

    def losses():
        z = torch.tanh(shared(x))
        return {t: 10 * ((heads[t](z) - y[t]) ** 2).mean() for t in heads}

    params = list(shared.parameters())
    context = _context(
        shared_params=params, task_params={t: list(h.parameters()) for t, h in heads.items()}
    )
    result = NashMTL().backward(losses(), context)
    got = [p.grad.clone() for p in params]
    got_head = [p.grad.clone() for p in heads["b"].parameters()]

    current = losses()
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(current[t], params, retain_graph=True)])
        for t in heads
    ]
    alpha = nash_weights(gramian(torch.stack(rows)).numpy())
    for p in params:
        p.grad = None
    sum(float(a) * current[t] for a, t in zip(alpha, heads, strict=True)).backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert norm > 1.0  # the clip is active
    for g, p in zip(got, params, strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7)
    assert math.isclose(torch.cat([g.flatten() for g in got]).norm().item(), 1.0, rel_tol=1e-5)
    scale = 1.0 / math.sqrt(3)  # |Jᵀα| = √T for the exact α
    assert np.allclose([result.weights[t] for t in heads], alpha * scale, rtol=1e-6)
    own = torch.autograd.grad(losses()["b"], list(heads["b"].parameters()))
    for g, e in zip(got_head, own, strict=True):
        assert torch.allclose(g, e, atol=1e-6)


def test_rep_mode_caps_the_shared_parameters_gradient_after_the_backward():
    """In ``rep`` mode the weights come from the feature Gramian; max_norm still caps the
    shared parameters' gradient (measured after the backbone backward), heads untouched."""

    def run(method):
        torch.manual_seed(0)
        shared = torch.nn.Linear(4, 6)
        heads = {t: torch.nn.Linear(6, 1) for t in ("a", "b", "c")}
        x, y = torch.randn(16, 4), {t: torch.randn(16, 1) for t in heads}
        features = torch.tanh(shared(x))
        leaf = features.detach().requires_grad_()
        losses = {t: 10 * ((heads[t](leaf) - y[t]) ** 2).mean() for t in heads}
        context = _context(
            shared_params=list(shared.parameters()),
            task_params={t: list(h.parameters()) for t, h in heads.items()},
            features=[features],
            head_inputs=[leaf],
        )
        result = method.backward(losses, context)
        shared_grad = torch.cat([p.grad.flatten() for p in shared.parameters()])
        head_grad = torch.cat([p.grad.flatten() for p in heads["a"].parameters()])
        return result, shared_grad, head_grad

    free, free_shared, free_head = run(NashMTL(mode="rep", max_norm=None))
    capped, capped_shared, capped_head = run(NashMTL(mode="rep"))
    norm = free_shared.norm().item()
    assert norm > 1.0  # the cap is active
    assert math.isclose(capped_shared.norm().item(), 1.0, rel_tol=1e-6)
    assert torch.allclose(capped_shared, free_shared / norm, rtol=1e-5, atol=1e-7)
    assert torch.equal(capped_head, free_head)
    for task in free.weights:
        assert math.isclose(capped.weights[task], free.weights[task] / norm, rel_tol=1e-6)


# ----------------------------------------------------------------------------- rank-deficient G
def test_rank_deficient_gramian_with_a_solution_is_solved_exactly():
    """g_3 = g_1 + g_2: G is singular, yet α = (2, 2, 1)/√6 solves the equation (by hand:
    α_1(α_1 + α_3) = α_3(α_1 + α_2 + 2α_3) = 1 with α_1 = α_2 = 2α_3)."""
    jacobian = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64
    )
    g = gramian(jacobian)
    assert torch.linalg.matrix_rank(g) == 2
    alpha = NashMTL(max_norm=None).weights(g, _context())
    expected = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64) / math.sqrt(6)
    assert torch.allclose(alpha, expected, atol=1e-12)


def test_task_without_gradient_gets_weight_zero_and_the_others_bargain():
    jacobian = _conflicting_jacobian(3, 2)
    jacobian[2] = 0  # e.g. a batch without any valid pixel for that task
    g = gramian(jacobian)
    alpha = NashMTL(max_norm=None).weights(g, _context())
    assert alpha[2] == 0
    assert torch.allclose(alpha[:2], torch.from_numpy(nash_weights(g[:2, :2].numpy())))
    with pytest.raises(NashSolveError, match="zero"):
        nash_weights(g.numpy())


@pytest.mark.parametrize(
    "opposed", [[[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]]
)
def test_pareto_stationary_gradients_have_no_solution_no_update_and_a_warning(opposed, caplog):
    """Some α ≥ 0 gives Σ α_i g_i = 0: f decreases without bound, no weights exist. The
    shared update is zero for that step and a warning says so."""
    g = gramian(torch.tensor(opposed, dtype=torch.float64))
    with pytest.raises(NashSolveError):
        nash_weights(g.numpy())
    with caplog.at_level(logging.WARNING, logger="mtl.balancers.gramian"):
        alpha = NashMTL().weights(g, _context())
    assert torch.equal(alpha, torch.zeros(len(opposed), dtype=torch.float64))
    assert "no bargaining solution" in caplog.text and "Pareto stationary" in caplog.text


def test_non_finite_gramian_gives_nan_weights_for_the_non_finite_check():
    g = torch.eye(3, dtype=torch.float64)
    g[1, 1] = float("inf")
    assert NashMTL().weights(g, _context()).isnan().all()


# ----------------------------------------------------------------------------- configuration
def test_config_builds_the_reference_defaults_and_takes_the_options():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=["balancer=nash"])
        other = compose(
            config_name="train",
            overrides=["balancer=nash", "balancer.max_norm=null", "balancer.normalize=true"],
        )
    method = build_balancer(cfg.balancer, None, ["a", "b"])
    assert isinstance(method, NashMTL) and method.max_norm == 1.0 and not method.normalize
    method = build_balancer(other.balancer, None, ["a", "b"])
    assert method.max_norm is None and method.normalize


@pytest.mark.parametrize(
    "options,key",
    [
        ({"max_norm": -1.0}, "max_norm"),
        ({"max_norm": "1"}, "max_norm"),
        ({"normalize": 1}, "normalize"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options, key):
    with pytest.raises(ValueError, match=f"balancer.{key}="):
        NashMTL(**options)
