"""Methods that need the whole Jacobian (a T x P state, coordinate-wise rules, or several
mini-batches): each against TorchJD 0.18 where it has the method, else against its definition
computed by hand here, and each trained once through train.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtl.balancers.base import BalanceContext
from mtl.balancers.dbmtl import DBMTL
from mtl.balancers.excessmtl import ExcessMTL
from mtl.balancers.full_jacobian import config_problems, project_onto_simplex
from mtl.balancers.graddrop import GradDrop
from mtl.balancers.moco import MoCo
from mtl.balancers.modo import MoDo
from mtl.balancers.sdmgrad import SDMGrad
from mtl.balancers.trimmed_mean import TrimmedMean
from mtl.balancers.weighting import Equal
from mtl.batch_parts import running_stats_set_aside, split_batch
from mtl.train import build_module, train

FAMILY = ["dbmtl", "excessmtl", "moco", "graddrop", "trimmed_mean", "modo", "sdmgrad"]


_context = BalanceContext.local


def _jacobians(steps: int, tasks: int = 3, dim: int = 7, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tasks, dim, generator=generator) for _ in range(steps)]


def _losses(tasks: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(tasks, generator=torch.Generator().manual_seed(seed)) + 0.5


class Toy(nn.Module):
    """A shared linear layer and one linear head per task."""

    def __init__(self, tasks=("a", "b", "c"), batch: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tasks = tasks
        self.shared = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in tasks})
        self.x = torch.randn(batch, 3)
        self.y = {t: torch.randn(batch, 1) * (i + 1) for i, t in enumerate(tasks)}

    def losses(self, tasks=None, rows=slice(None)) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.shared(self.x[rows]))
        return {
            t: ((self.heads[t](features) - self.y[t][rows]) ** 2).mean()
            for t in tasks or self.tasks
        }

    def context(self, step: int = 0, **kwargs) -> BalanceContext:
        return _context(
            step=step,
            shared_params=list(self.shared.parameters()),
            task_params={t: list(h.parameters()) for t, h in self.heads.items()},
            recompute_losses=lambda tasks=None: self.losses(tasks),
            model=self,
            **kwargs,
        )

    def jacobian(self) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Shared Jacobian rows and each head's own gradient, by autograd."""
        rows, heads = [], {}
        for task, loss in self.losses().items():
            own = list(self.heads[task].parameters())
            grads = torch.autograd.grad(
                loss, list(self.shared.parameters()) + own, retain_graph=True
            )
            rows.append(torch.cat([g.reshape(-1) for g in grads[:2]]))
            heads[task] = list(grads[2:])
        return torch.stack(rows), heads


def _shared_grad(toy: Toy) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in toy.shared.parameters()])


# ------------------------------------------------------------------------------------ DB-MTL
def _dbmtl_by_hand(jacobians, losses, beta=0.9, sigma=0.0):
    momentum, updates = torch.zeros_like(jacobians[0]), []
    for k, jacobian in enumerate(jacobians, start=1):
        g = jacobian / (losses[:, None] + 1e-8)
        b = beta / k**sigma
        momentum = (1 - b) * g + b * momentum
        norms = momentum.norm(dim=1)
        updates.append((norms.max() / (norms + 1e-8)) @ momentum)
    return updates, momentum


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_dbmtl_matches_its_definition_over_steps(sigma):
    jacobians, losses = _jacobians(4), _losses()
    method = DBMTL(beta=0.9, beta_sigma=sigma)
    expected, momentum = _dbmtl_by_hand(jacobians, losses, sigma=sigma)
    for k, (jacobian, want) in enumerate(zip(jacobians, expected, strict=True)):
        got, _ = method.aggregate(jacobian, losses, _context(step=k))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.momentum, momentum, rtol=1e-5, atol=1e-6)


def test_dbmtl_state_ramps_up_without_bias_correction():
    """With a constant gradient the buffer after k steps is (1 − 0.9^k)·g: 0.1·g after one."""
    jacobian, losses = _jacobians(1)[0], torch.ones(3)
    method = DBMTL()
    for k in range(1, 4):
        method.aggregate(jacobian, losses, _context())
        torch.testing.assert_close(method.momentum, (1 - 0.9**k) * jacobian / (1 + 1e-8))
    assert int(method.steps) == 3


def test_dbmtl_ignores_the_scale_of_each_loss():
    """log(c·L) has the gradient of log L: scaling a task's loss (its gradient and its value)
    leaves the update unchanged."""
    jacobian, losses = _jacobians(1)[0], _losses()
    scale = torch.tensor([1.0, 100.0, 0.01])
    plain, _ = DBMTL().aggregate(jacobian, losses, _context())
    scaled, _ = DBMTL().aggregate(jacobian * scale[:, None], losses * scale, _context())
    torch.testing.assert_close(plain, scaled, rtol=1e-4, atol=1e-7)


def test_dbmtl_backward_writes_the_update_and_log_loss_gradients_to_heads():
    toy = Toy()
    jacobian, heads = toy.jacobian()
    losses = torch.stack([loss.detach() for loss in toy.losses().values()])
    (expected,), _ = _dbmtl_by_hand([jacobian], losses)
    result = DBMTL().backward(toy.losses(), toy.context())
    torch.testing.assert_close(_shared_grad(toy), expected, rtol=1e-5, atol=1e-7)
    for i, task in enumerate(toy.tasks):
        for p, g in zip(toy.heads[task].parameters(), heads[task], strict=True):
            torch.testing.assert_close(p.grad, g / (losses[i] + 1e-8))
    assert result.gramian is not None and result.gramian.shape == (3, 3)


def test_dbmtl_state_survives_a_checkpoint():
    method = DBMTL()
    for jacobian in _jacobians(2):
        method.aggregate(jacobian, _losses(), _context())
    restored = DBMTL()
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.momentum, method.momentum)
    nxt = _jacobians(3)[2]
    torch.testing.assert_close(
        restored.aggregate(nxt, _losses(), _context())[0],
        method.aggregate(nxt, _losses(), _context())[0],
    )


@pytest.mark.parametrize("method", [DBMTL, MoCo, ExcessMTL, MoDo, SDMGrad])
def test_stateful_methods_refuse_rep_mode(method):
    """Their state (or cross-matrix) would pair features of different samples."""
    kwargs = {} if method is DBMTL else {"num_tasks": 3}
    with pytest.raises(ValueError, match="balancer.mode='rep'.*supports only 'param'"):
        method(mode="rep", **kwargs)


@pytest.mark.parametrize("method", [DBMTL, MoCo, ExcessMTL])
def test_stateful_methods_refuse_a_second_jacobian_of_the_step(method):
    kwargs = {"num_tasks": 3} if method in (MoCo, ExcessMTL) else {}
    with pytest.raises(ValueError, match="flat=sam"):
        losses = dict(zip("abc", _losses(), strict=True))
        method(**kwargs).combine(_jacobians(1)[0], losses, _context())


# --------------------------------------------------------------------------------- ExcessMTL
def test_excessmtl_torchjd_convention_matches_torchjd():
    torchjd = pytest.importorskip("torchjd.aggregation")
    for warmup in (0, 2):
        reference = torchjd.ExcessMTLWeighting(robust_step_size=1.0, n_warmup_steps=warmup)
        method = ExcessMTL(3, robust_step_size=1.0, warmup_steps=warmup, convention="torchjd")
        for jacobian in _jacobians(5):
            want = reference(jacobian)
            update, weights = method.aggregate(jacobian, _losses(), _context())
            torch.testing.assert_close(weights, want)
            torch.testing.assert_close(update, want @ jacobian)
            assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-6)


def _excess(jacobians):
    squared_sum = sum(j.square() for j in jacobians)
    return (jacobians[-1].square() / (squared_sum + 1e-7).sqrt()).sum(dim=1)


def test_excessmtl_libmtl_convention_by_hand():
    """LibMTL: weights 1 and no update on the first call (it records Ê⁰), then
    w ← T·normalise(w·exp(η Ê/Ê⁰)); heads get w_t ∇L_t."""
    jacobians, eta = _jacobians(3), 0.5
    method = ExcessMTL(3, robust_step_size=eta)
    _, first = method.aggregate(jacobians[0], _losses(), _context())
    torch.testing.assert_close(first, torch.ones(3))
    baseline = _excess(jacobians[:1])
    weights = torch.ones(3)
    for k in (2, 3):
        weights = weights * torch.exp(eta * _excess(jacobians[:k]) / (baseline + 1e-7))
        weights = 3 * weights / weights.sum()
        update, got = method.aggregate(jacobians[k - 1], _losses(), _context())
        torch.testing.assert_close(got, weights)
        torch.testing.assert_close(update, weights @ jacobians[k - 1])
    toy = Toy()
    result = method.backward(toy.losses(), toy.context())
    weights = torch.tensor([result.weights[t] for t in toy.tasks])
    _, heads = toy.jacobian()
    for i, task in enumerate(toy.tasks):
        for p, g in zip(toy.heads[task].parameters(), heads[task], strict=True):
            torch.testing.assert_close(p.grad, weights[i] * g)


def test_excessmtl_shifts_weight_to_the_task_far_from_its_start():
    """A task whose gradient stays large (excess risk not falling) gains weight over tasks whose
    gradients shrink."""
    method = ExcessMTL(2, robust_step_size=1.0)
    for k in range(1, 6):
        _, weights = method.aggregate(torch.tensor([[1.0, 1.0], [1.0 / k, 1.0 / k]]), None, None)
    assert weights[0] > 1.2 > 0.8 > weights[1]


# -------------------------------------------------------------------------------------- MoCo
def test_moco_matches_its_definition_and_tracks_y():
    jacobians, losses = [j.double() for j in _jacobians(4)], _losses().double()
    beta, gamma, rho = 0.5, 0.1, 0.2
    method = MoCo(3, rho=rho)
    y, lam = torch.zeros_like(jacobians[0]), torch.full((3,), 1 / 3, dtype=torch.float64)
    for k, jacobian in enumerate(jacobians, start=1):
        target = jacobian / (jacobian.norm(dim=1, keepdim=True) + 1e-8) * losses[:, None]
        y = y - beta / math.sqrt(k) * (y - target)
        lam = torch.softmax(lam - gamma / math.sqrt(k) * (y @ y.T + rho * torch.eye(3)) @ lam, 0)
        update, weights = method.aggregate(jacobian, losses, _context())
        torch.testing.assert_close(method.tracked, y)
        torch.testing.assert_close(weights, lam)
        torch.testing.assert_close(update, y.T @ lam)
        if k == 1:  # y_1 = β·ĝ_1: the first step moves halfway to the rescaled gradients
            torch.testing.assert_close(y, 0.5 * target)
        assert math.isclose(float(weights.sum()), 1.0)


def test_moco_heads_get_their_own_gradients():
    toy = Toy()
    _, heads = toy.jacobian()
    MoCo(3).backward(toy.losses(), toy.context())
    for task in toy.tasks:
        for p, g in zip(toy.heads[task].parameters(), heads[task], strict=True):
            torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------------------------- GradDrop
@pytest.mark.parametrize("leak", [0.0, [0.0, 0.3, 1.0]])
def test_graddrop_matches_torchjd_with_the_same_uniform_draws(leak):
    torchjd = pytest.importorskip("torchjd.aggregation")
    jacobian = _jacobians(1, tasks=3, dim=200)[0]
    seed, step = 7, 11
    torch.manual_seed(seed * 1_000_003 + step)  # TorchJD draws U from the global generator
    reference = torchjd.GradDrop(leak=None if leak == 0.0 else torch.tensor(leak))(jacobian)
    got, _ = GradDrop(leak=leak).aggregate(jacobian, None, _context(step=step, seed=seed))
    torch.testing.assert_close(got, reference)
    assert (got != jacobian.sum(0)).any()  # something was dropped


def test_graddrop_keeps_agreeing_signs_and_is_reproducible():
    jacobian = _jacobians(1, dim=50)[0].abs()
    jacobian[:, :10] *= -1  # every task agrees on each coordinate's sign
    got, _ = GradDrop().aggregate(jacobian, None, _context(step=3))
    torch.testing.assert_close(got, jacobian.sum(0))
    mixed = _jacobians(1, dim=50, seed=5)[0]
    first, _ = GradDrop().aggregate(mixed, None, _context(step=3))
    again, _ = GradDrop().aggregate(mixed, None, _context(step=3))
    other, _ = GradDrop().aggregate(mixed, None, _context(step=4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_graddrop_leak_one_is_the_sum():
    jacobian = _jacobians(1, dim=50)[0]
    got, _ = GradDrop(leak=1.0).aggregate(jacobian, None, _context())
    torch.testing.assert_close(got, jacobian.sum(0))


class RepToy(Toy):
    """The toy in ``rep`` mode: heads decode from a detached copy of the features (B x 2 x 2)."""

    def rep_losses(self):
        self.features = torch.tanh(self.shared(self.x)).view(-1, 2, 2)
        self.leaf = self.features.detach().requires_grad_(True)
        flat = self.leaf.reshape(-1, 4)
        return {t: ((self.heads[t](flat) - self.y[t]) ** 2).mean() for t in self.tasks}

    def feature_jacobian(self, losses):
        rows = [torch.autograd.grad(loss, self.leaf, retain_graph=True)[0] for loss in losses]
        return torch.stack(rows)  # T x B x 2 x 2

    def backbone_grad(self, feature_grad):
        params = list(self.shared.parameters())
        grads = torch.autograd.grad(self.features, params, feature_grad, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_graddrop_rep_mode_is_the_sign_weighted_batch_form(leak):
    """LibMTL's form: purity per feature position from Σ_batch ∂L_t/∂Z · sign(Z), one mask per
    task and position applied to every sample, masked gradients summed over tasks."""
    toy = RepToy(batch=6)
    losses = toy.rep_losses()
    per_sample = toy.feature_jacobian(losses.values()).reshape(3, 6, 4)
    sums = (per_sample * toy.leaf.detach().reshape(1, 6, 4).sign()).sum(dim=1)  # T x 4
    purity = 0.5 * (1 + sums.sum(0) / (sums.abs().sum(0) + 1e-7))
    context = toy.context(step=5, features=[toy.features], head_inputs=[toy.leaf])
    draws = torch.rand(4, generator=context.generator())
    mask = (purity > draws) & (sums > 0) | (purity < draws) & (sums < 0)
    factor = leak + (1 - leak) * mask.float()
    feature_grad = (per_sample * factor[:, None, :]).sum(0).view(6, 2, 2)
    expected = toy.backbone_grad(feature_grad)
    _, heads = toy.jacobian()
    result = GradDrop(leak=leak, mode="rep").backward(losses, context)
    torch.testing.assert_close(_shared_grad(toy), expected)
    assert result.weights["a"] == pytest.approx(float(factor[0].mean()))
    for task in toy.tasks:
        for p, g in zip(toy.heads[task].parameters(), heads[task], strict=True):
            torch.testing.assert_close(p.grad, g)


def test_trimmed_mean_rep_mode_trims_every_feature_coordinate():
    toy = RepToy(batch=6)
    losses = toy.rep_losses()
    per_sample = toy.feature_jacobian(losses.values())
    feature_grad = per_sample.sort(dim=0).values[1]  # 3 tasks, k = 1: the median
    expected = toy.backbone_grad(feature_grad)
    context = toy.context(features=[toy.features], head_inputs=[toy.leaf])
    TrimmedMean(3, mode="rep").backward(losses, context)
    torch.testing.assert_close(_shared_grad(toy), expected)


# ------------------------------------------------------------------------------ TrimmedMean
@pytest.mark.parametrize(("tasks", "trim"), [(3, 1), (5, 1), (5, 2), (4, 0)])
def test_trimmed_mean_matches_torchjd(tasks, trim):
    torchjd = pytest.importorskip("torchjd.aggregation")
    jacobian = _jacobians(1, tasks=tasks, dim=40)[0]
    got, weights = TrimmedMean(tasks, trim_number=trim).aggregate(jacobian, None, _context())
    torch.testing.assert_close(got, torchjd.TrimmedMean(trim_number=trim)(jacobian))
    assert math.isclose(float(weights.sum()), 1.0)


def test_trimmed_mean_drops_an_outlier_task():
    jacobian = torch.tensor([[1.0, 2.0], [1.2, 2.2], [1e6, -1e6]])
    got, _ = TrimmedMean(3, trim_number=1).aggregate(jacobian, None, _context())
    torch.testing.assert_close(got, torch.tensor([1.2, 2.0]))


def test_trimmed_mean_needs_enough_tasks():
    with pytest.raises(ValueError, match="balancer.trim_number: 1; .* at least 3 tasks"):
        TrimmedMean(2, trim_number=1)


# ------------------------------------------------------------------------------- helpers
def test_simplex_projection():
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([0.5, 0.5, 0.5])), torch.full((3,), 1 / 3)
    )
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([2.0, 0.0, -1.0])), torch.tensor([1.0, 0.0, 0.0])
    )
    torch.testing.assert_close(
        project_onto_simplex(torch.tensor([0.6, 0.5, -1.0])), torch.tensor([0.55, 0.45, 0.0])
    )


# ----------------------------------------------------------------------------- end to end
END_TO_END = [
    *(f"balancer={name}" for name in FAMILY),
    "balancer=graddrop balancer.mode=rep",
    "balancer=trimmed_mean balancer.mode=rep",
    "balancer=graddrop flat=sam",  # stateless: both Jacobians of the step aggregated alike
]


@pytest.mark.parametrize("overrides", END_TO_END)
def test_trains_through_train_py(make_cfg, overrides):
    cfg = make_cfg(*overrides.split(), "debug=fdr", "data.tasks=[semseg,depth,normals]")
    scores = train(cfg)
    assert math.isfinite(scores["val/loss"])


# ------------------------------------------------------------------------- MoDo / SDMGrad
def _cross_matrices(steps: int, tasks: int = 3) -> list[torch.Tensor]:
    pairs = zip(_jacobians(steps, tasks, seed=2), _jacobians(steps, tasks, seed=3), strict=True)
    return [(a @ b.T).double() for a, b in pairs]


def test_modo_weights_match_torchjd_over_steps():
    torchjd = pytest.importorskip("torchjd.aggregation")
    reference = torchjd.MoDoWeighting(gamma=0.1, rho=0.1)
    method = MoDo(3, gamma=0.1, rho=0.1)
    for cross in _cross_matrices(5):
        torch.testing.assert_close(method.weights_from(cross), reference(cross))
    assert not torch.allclose(method.task_weights, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("lr", [5.0, 10.0])
def test_sdmgrad_weights_match_torchjd_over_steps(lr):
    torchjd = pytest.importorskip("torchjd.aggregation")
    reference = torchjd.SDMGradWeighting(lr=lr, momentum=0.5, n_iter=20, lambda_=0.3)
    method = SDMGrad(3, lr=lr)
    for cross in _cross_matrices(4):
        torch.testing.assert_close(method.weights_from(cross), reference(cross))


class SplitToy(Toy):
    """The toy with `BalanceContext.part_losses`: consecutive rows of its batch of 6."""

    def context(self, step: int = 0, **kwargs) -> BalanceContext:
        return super().context(step, part_losses=self.parts, **kwargs)

    def parts(self, n: int) -> list[dict[str, torch.Tensor]]:
        return [self.losses(rows=rows) for rows in torch.arange(6).tensor_split(n)]

    def part_jacobian(self, rows) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        full = self.x
        self.x, ys = full[rows], self.y
        self.y = {t: y[rows] for t, y in ys.items()}
        try:
            return self.jacobian()
        finally:
            self.x, self.y = full, ys


@pytest.mark.parametrize(("method", "parts"), [("modo", 3), ("modo", 2), ("sdmgrad", 3)])
def test_multi_batch_methods_use_independent_parts(method, parts):
    """λ from the cross-matrix of parts 1 and 2, update on part 3 (or the mean of 1 and 2);
    heads: MoDo the mean over the parts (LibMTL divides by 3), SDMGrad their sum."""
    torchjd = pytest.importorskip("torchjd.aggregation")
    toy = SplitToy()
    rows = torch.arange(6).tensor_split(parts)
    jacobians, heads = zip(*(toy.part_jacobian(r) for r in rows), strict=True)
    cross = (jacobians[0].double() @ jacobians[1].double().T).double()
    if method == "modo":
        balancer, reference = MoDo(3, parts=parts), torchjd.MoDoWeighting(gamma=1e-3, rho=0.1)
    else:
        balancer, reference = SDMGrad(3, parts=parts), torchjd.SDMGradWeighting(lr=5.0)
    weights = reference(cross)
    result = balancer.backward(toy.losses(), toy.context())
    direction = jacobians[2] if parts == 3 else (jacobians[0] + jacobians[1]) / 2
    torch.testing.assert_close(_shared_grad(toy), weights.float() @ direction)
    assert [result.weights[t] for t in toy.tasks] == pytest.approx(weights.tolist())
    divisor = parts if method == "modo" else 1
    for task in toy.tasks:
        for i, p in enumerate(toy.heads[task].parameters()):
            want = sum(h[task][i] for h in heads) / divisor
            torch.testing.assert_close(p.grad, want)


def test_a_batch_smaller_than_the_parts_names_data_batch_size():
    batch = {"image": torch.zeros(2, 3, 4, 4), "depth": torch.zeros(2, 1, 4, 4)}
    with pytest.raises(ValueError, match="data.batch_size: .* into 3 independent parts.* 2 s"):
        split_batch(batch, 3)
    pieces = split_batch({**batch, "skipped": torch.tensor(0)}, 2)
    assert [p["image"].shape[0] for p in pieces] == [1, 1]
    assert all(p["skipped"].dim() == 0 for p in pieces)


def test_a_training_batch_too_small_to_split_names_data_batch_size(make_cfg):
    """Refused with the key to change (by the config check before anything is built once it
    reads the balancer's ``parts``; at the first step otherwise)."""
    with pytest.raises(ValueError, match="data.batch_size"):
        train(make_cfg("balancer=modo", "data.batch_size=2", "debug=fdr"))


@pytest.mark.parametrize("method", [MoDo, SDMGrad])
def test_multi_batch_methods_cannot_aggregate_one_jacobian(method):
    with pytest.raises(ValueError, match="independent mini-batches"):
        method(3).combine(_jacobians(1)[0], dict(zip("abc", _losses(), strict=True)), _context())


def test_part_passes_leave_batchnorm_statistics_and_keep_their_graphs():
    norm = nn.BatchNorm1d(2)
    x = torch.randn(5, 2, requires_grad=True)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with running_stats_set_aside(norm):
        out = norm(x * 3 + 1).square().sum()
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    out.backward()  # the graph built inside is still valid
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_parameter_space_state_is_checkpointed_and_resumed(make_cfg, tmp_path):
    """DB-MTL's T x P buffer is sized at the first step: it lands in the checkpoint, loads into
    a freshly built module, and a resumed run continues from it."""
    run = tmp_path / "run"
    small = (
        "balancer=dbmtl",
        "model.backbone.name=test_resnet",
        "data.tasks=[semseg,depth,normals]",
        "trainer.num_sanity_val_steps=0",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
    )
    cfg = make_cfg(*small, "trainer.max_epochs=1", output_dir=run)
    train(cfg)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    momentum, steps = saved["balancer.momentum"], saved["balancer.steps"]
    assert momentum.shape[0] == 3 and momentum.abs().sum() > 0 and int(steps) == 2
    module = build_module(cfg)
    module.load_state_dict(saved)
    assert torch.equal(module.balancer.momentum, momentum)

    train(make_cfg(*small, "trainer.max_epochs=2", "ckpt_path=last", output_dir=run))
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert int(resumed["balancer.steps"]) == 4
    assert not torch.equal(resumed["balancer.momentum"], momentum)


@pytest.mark.parametrize("name", ["dbmtl", "moco", "excessmtl", "modo"])
def test_a_non_finite_gradient_leaves_the_state_untouched(name):
    """The training step skips a step whose gradients are not finite; the state must not take
    that step in, or every later step would be non-finite too."""
    toy = SplitToy()
    method = {
        "dbmtl": DBMTL(),
        "moco": MoCo(3),
        "excessmtl": ExcessMTL(3),
        "modo": MoDo(3, gamma=0.1),
    }[name]
    method.backward(toy.losses(), toy.context())
    before = {k: v.clone() for k, v in method.state_dict().items()}
    toy.shared.weight.register_hook(lambda grad: grad * float("nan"))  # e.g. an overflow
    method.backward(toy.losses(), toy.context())
    assert not _shared_grad(toy).isfinite().all()
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------ config check
def _node(name: str, **overrides) -> DictConfig:
    node = OmegaConf.load(Path(__file__).parents[1] / "conf" / "balancer" / f"{name}.yaml")
    return OmegaConf.merge(node, overrides)


def _problems(name, tasks=3, batch=4, flat=False, **overrides) -> list[str]:
    node = _node(name, **overrides)
    return config_problems(get_class(node._target_), node, tasks, batch, flat)


@pytest.mark.parametrize("name", FAMILY)
def test_shipped_configs_pass_the_config_check(name):
    assert _problems(name) == []


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dbmtl", {"mode": "rep"}, "balancer.mode: 'rep'; DBMTL supports only 'param'"),
        ("moco", {"flat": True}, "flat: MoCo keeps a state"),
        ("modo", {"batch": 2}, "data.batch_size: MoDo splits each process's batch into 3"),
        ("sdmgrad", {"batch": 1, "parts": 2}, "into 2 independent parts"),
        ("trimmed_mean", {"tasks": 2}, "balancer.trim_number: 1; .* at least 3 tasks"),
        ("graddrop", {"leak": [0.1, 0.2]}, r"balancer.leak: \[0.1, 0.2\]; .* one per task \(3"),
    ],
)
def test_config_check_names_the_key(name, kwargs, message):
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in ("mode", "parts", "leak")}
    problems = _problems(name, **kwargs, **options)
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_config_check_accepts_what_works():
    assert _problems("graddrop", flat=True) == []  # stateless: flat regions are fine
    assert _problems("graddrop", mode="rep") == _problems("trimmed_mean", mode="rep") == []
    assert _problems("modo", batch=2, parts=2) == []
    assert config_problems(Equal, OmegaConf.create({"mode": "rep"}), 3, 1, True) == []
