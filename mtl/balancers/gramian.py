"""Gradient methods whose update is Jᵀw, with the weights w a function of the Gramian G = JJᵀ.

Writing every method as ``weights = method(G)`` (as TorchJD does) keeps them small, lets the
same method run on parameter gradients (``param`` mode) or on gradients with respect to the
shared features (``rep`` mode), and makes DDP exact: every process solves for w on the same
all-reduced G, on the CPU in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import minimize, nnls
from torch import Tensor

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult
from mtl.balancers.jacobian import (
    TaskGradients,
    backward_through_features,
    feature_gradients,
    gramian,
)
from mtl.balancers.nash import NashSolveError, nash_weights
from mtl.balancers.streamed import BatchedBackwardError, streamed_gramian

log = logging.getLogger(__name__)

MODES = ("param", "rep")
#: Values of ``balancer.jacobian`` (how ``param`` mode forms the Gramian).
JACOBIANS = ("stored", "streamed")


class GramianMethod(Balancer):
    """Base class: per-task gradients, weights from their Gramian, update Jᵀw.

    Args:
        mode: ``param`` (exact: T backward passes over the shared parameters) or ``rep``
            (T backward passes through the heads to the shared features, weights from that
            Gramian, then one backward of Σ w_i L_i through the backbone).
    """

    needs_task_gradients = True
    #: ``rep`` mode: rescale the aggregated feature gradient of every feature level to their
    #: mean norm before the backbone backward (FULLER's calibration; ``balancer.equalize_levels``,
    #: set by ``build_balancer`` for every Gramian method)
    equalize_levels: bool = False
    #: ``param`` mode: ``stored`` (T backward passes into one T x P Jacobian) or ``streamed``
    #: (one batched backward adds each parameter's T rows to G and frees them, then one backward
    #: of Σ w_i L_i: `mtl.balancers.streamed`); ``balancer.jacobian``, set by ``build_balancer``
    jacobian: str = "stored"
    #: streamed mode met an operator without a batching rule: stored mode from then on
    _batching_failed: bool = False
    #: operators without a batching rule already named in the log
    _looped_logged: frozenset[str] = frozenset()

    def __init__(self, mode: str = "param") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"balancer.mode={mode!r}; expected one of {MODES}")
        self.mode = mode

    @property
    def uses_representation(self) -> bool:
        return self.mode == "rep"

    @property
    def uses_stem(self) -> bool:
        return self.mode == "param" and self.jacobian == "streamed"

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        """Weights (float64, length T) from the T x T Gramian (float64, CPU)."""
        raise NotImplementedError

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        weights = self.weights(gramian(jacobian), context)
        return weights.to(jacobian) @ jacobian, weights

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        if self.mode == "rep":
            return self._backward_rep(losses, context)
        if self.jacobian == "streamed" and not self._batching_failed:
            result = self._backward_streamed(losses, context)
            if result is not None:
                return result
        grads = TaskGradients.compute(losses, context)
        gram = gramian(grads.jacobian)
        weights = self.weights(gram, context)
        grads.write(weights.to(grads.jacobian) @ grads.jacobian, context)
        return BalanceResult(dict(zip(losses, weights.tolist(), strict=True)), gram)

    def _backward_rep(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        grads = feature_gradients(losses, context)
        local = grads.jacobian  # T x (this process's feature elements)
        # The global loss is the mean of the processes' losses, so its feature gradients are the
        # local ones divided by the world size: G = mean over processes of Z Zᵀ / world size.
        gram = context.all_reduce_mean(gramian(local).to(local.device)).cpu() / context.world_size
        weights = self.weights(gram, context)
        parts = _split_like(weights.to(local) @ local, grads.leaves)
        if self.equalize_levels:
            parts = equalized_levels(parts, context)
        backward_through_features(grads, parts, context)
        return BalanceResult(dict(zip(losses, weights.tolist(), strict=True)), None)

    def _backward_streamed(
        self, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> BalanceResult | None:
        """``param`` mode without the T x P Jacobian: G from one batched backward, then one
        backward of Σ w_i L_i; None (logged once) where the backward cannot be batched."""
        try:
            gram, heads, looped = streamed_gramian(losses, context)
        except BatchedBackwardError as error:
            if not self._batching_failed:
                log.warning(
                    "balancer.jacobian=streamed: the batched backward failed (%s); falling back "
                    "to per-task backward passes with the stored Jacobian (balancer.jacobian="
                    "stored) for every step of this run",
                    error,
                )
            self._batching_failed = True
            return None
        if looped - self._looped_logged:
            log.warning(
                "balancer.jacobian=streamed: no batching rule for %s; the batched backward runs "
                "it once per task (as many passes as balancer.jacobian=stored needs for it)",
                ", ".join(sorted(looped - self._looped_logged)),
            )
            self._looped_logged = self._looped_logged | looped
        weights = self.weights(gram, context)
        total = sum(w * loss for w, loss in zip(weights.tolist(), losses.values(), strict=True))
        context.backward(total)
        for task, grads in heads.items():  # each head: its own task's gradient, unweighted
            for p, g in zip(context.task_params.get(task, ()), grads, strict=True):
                p.grad = g.to(p.dtype)
        return BalanceResult(dict(zip(losses, weights.tolist(), strict=True)), gram)


def equalized_levels(parts: list[Tensor], context: BalanceContext) -> list[Tensor]:
    """Each level's slice of the feature gradient rescaled to the mean norm of the non-zero
    slices (FULLER-style calibration, Huang et al. 2023). Norms are those of the global batch:
    squared norms are summed over processes, so every process scales alike."""
    squared = torch.stack([p.detach().float().pow(2).sum() for p in parts])
    if context.world_size > 1:
        squared = context.all_reduce_mean(squared) * context.world_size
    norms = squared.sqrt()
    present = norms > 0
    if present.sum() < 2:
        return parts
    target = norms[present].mean()
    scales = torch.where(present, target / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)
    return [p * scale.to(p.dtype) for p, scale in zip(parts, scales, strict=True)]


def _split_like(vector: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(vector.split([t.numel() for t in tensors]))


def _simplex_qp(objective, gradient, num_tasks: int) -> np.ndarray:
    """Minimise a smooth convex function over the probability simplex (SLSQP, float64)."""
    start = np.full(num_tasks, 1.0 / num_tasks)
    result = minimize(
        objective,
        start,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * num_tasks,
        constraints=(
            {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},
        ),
        options={"ftol": 1e-12, "maxiter": 200},
    )
    return np.clip(result.x, 0.0, None) / np.clip(result.x, 0.0, None).sum()


class PCGrad(GramianMethod):
    """Projecting conflicting gradients [Yu et al. 2020].

    For each task i, g_i' starts at g_i; for every task j in a random order, if g_i'·g_j < 0 then
    g_i' −= (g_i'·g_j / |g_j|²) g_j. The update is the sum (or mean) of the g_i'. Each g_i' is
    tracked as coefficients over the original gradients, so only G is needed. The order comes
    from a generator seeded by (seed, step): identical on every process.
    """

    def __init__(self, reduction: str = "sum", mode: str = "param") -> None:
        super().__init__(mode)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"balancer.reduction={reduction!r}; expected 'sum' or 'mean'")
        self.reduction = reduction

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        num_tasks = gram.shape[0]
        generator = context.generator()
        coefficients = torch.eye(num_tasks, dtype=torch.float64)
        for i in range(num_tasks):
            for j in torch.randperm(num_tasks, generator=generator).tolist():
                if j == i:
                    continue
                dot = coefficients[i] @ gram[:, j]
                if dot < 0 and gram[j, j] > 0:
                    coefficients[i, j] -= dot / gram[j, j]
        weights = coefficients.sum(dim=0)
        return weights / num_tasks if self.reduction == "mean" else weights


class MGDA(GramianMethod):
    """Multiple-gradient descent [Désidéri 2012; Sener & Koltun 2018]: the minimum-norm point
    of the convex hull of the task gradients, w = argmin_{w ∈ simplex} wᵀGw."""

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        g = gram.numpy()
        w = _simplex_qp(lambda w: w @ g @ w, lambda w: 2 * g @ w, g.shape[0])
        return torch.from_numpy(w)


class CAGrad(GramianMethod):
    """Conflict-averse gradient descent [Liu et al. 2021].

    With g0 the mean gradient and c the conflict radius: w = argmin_{w ∈ simplex}
    g_wᵀg0 + c|g0|·|g_w|, update d = g0 + (c|g0| / |g_w|)·g_w, divided by (1 + c²) when
    `rescale`. c = 0 gives the mean gradient.
    """

    def __init__(self, c: float = 0.4, rescale: bool = True, mode: str = "param") -> None:
        super().__init__(mode)
        self.c, self.rescale = c, rescale

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        g = gram.numpy()
        t = g.shape[0]
        mean = np.full(t, 1.0 / t)
        radius = self.c * np.sqrt(max(mean @ g @ mean, 0.0) + 1e-12)

        def objective(w):
            return w @ g @ mean + radius * np.sqrt(w @ g @ w + 1e-12)

        def gradient(w):
            return g @ mean + radius * (g @ w) / np.sqrt(w @ g @ w + 1e-12)

        w = _simplex_qp(objective, gradient, t)
        norm_gw = np.sqrt(max(w @ g @ w, 0.0) + 1e-12)
        weights = mean + radius / norm_gw * w
        if self.rescale:
            weights = weights / (1 + self.c**2)
        return torch.from_numpy(weights)


class IMTL(GramianMethod):
    """Impartial MTL, gradient part [Liu et al. 2021]: the update has equal projections onto
    every task's unit gradient. With D_k = g_1 − g_k and U_k = u_1 − u_k (k = 2..T):
    α_{2..T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2..T}; all inner products come from G."""

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        norms = gram.diagonal().clamp_min(1e-20).sqrt()
        cross = gram / norms[None, :]  # cross[i, j] = g_i · u_j
        # (D Uᵀ)[a, b] = (g_1 − g_a)·(u_1 − u_b); (g_1 Uᵀ)[b] = g_1·(u_1 − u_b), a, b ≥ 2
        du = cross[0, 0] - cross[0, 1:][None, :] - cross[1:, 0][:, None] + cross[1:, 1:]
        gu = cross[0, 0] - cross[0, 1:]
        alpha = torch.linalg.lstsq(du.T, gu[:, None]).solution[:, 0]
        return torch.cat([1 - alpha.sum(0, keepdim=True), alpha])


class NashMTL(GramianMethod):
    """Nash bargaining [Navon et al. 2022]: the weights α > 0 with α_i (Gα)_i = 1 for every
    task, solved exactly (`mtl.balancers.nash`); the shared update Jᵀα has every task's
    directional derivative positive, and norm √T.

    Args:
        max_norm: the shared parameters' update is scaled down to this norm when longer, as
            the reference code's ``clip_grad_norm_`` (the returned weights include the scaling).
            In ``param`` mode that update is Jᵀα and its norm comes from G; in ``rep`` mode it
            is measured on the gradients the backbone backward wrote. ``None`` or 0: no scaling.
        normalize: solve on G/|G|_F instead of G (same direction, weights and step √|G|_F
            times the reference's; the behaviour of earlier versions with ``max_norm=None``).
        mode: ``param`` or ``rep`` (see `GramianMethod`).

    The defaults are the reference's (max_norm 1.0 on the unnormalised G). Weights are solved
    anew every step (the reference's ``update_weights_every=1``) from a cold start: the exact
    solve needs no warm start, so the weights depend on the current G only, which keeps resumed
    and multi-process runs exact. When no weights satisfy the equation (a task without a
    gradient on the shared parameters, or gradients that cancel: Pareto stationary), the
    tasks with a zero gradient get weight 0 and the others are solved again; if the remaining
    ones still have no solution, every weight is 0 (no shared update this step) and a warning
    is logged. A non-finite G gives NaN weights, which the training step's non-finite check
    reports and skips.
    """

    def __init__(
        self, max_norm: float | None = 1.0, normalize: bool = False, mode: str = "param"
    ) -> None:
        super().__init__(mode)
        number = isinstance(max_norm, int | float) and not isinstance(max_norm, bool)
        if max_norm is not None and not (number and max_norm >= 0):
            raise ValueError(f"balancer.max_norm={max_norm!r}; expected a number >= 0 or null")
        if not isinstance(normalize, bool):
            raise ValueError(f"balancer.normalize={normalize!r}; expected true or false")
        self.max_norm, self.normalize = max_norm, normalize

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        g = gram.numpy()
        if not np.isfinite(g).all():
            return torch.full((g.shape[0],), float("nan"), dtype=torch.float64)
        alpha = _nash_or_fallback(g)
        if self.normalize:
            alpha = alpha * np.sqrt(np.linalg.norm(g))
        if self.max_norm and self.mode == "param":  # rep: after the backward, `_backward_rep`
            norm = np.sqrt(max(alpha @ g @ alpha, 0.0))  # |Jᵀα|
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return torch.from_numpy(alpha)

    def _backward_rep(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        result = super()._backward_rep(losses, context)
        params = [p for p in context.shared_params if p.grad is not None]
        if self.max_norm and params:
            # After the backward (averaged over processes under DDP): the same norm everywhere.
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
            scale = min(1.0, self.max_norm / (norm + 1e-6))  # the factor clip_grad_norm_ applied
            result.weights = {task: w * scale for task, w in result.weights.items()}
        return result


def _nash_or_fallback(gram: np.ndarray) -> np.ndarray:
    """`nash_weights`, with tasks without gradient left out (weight 0), and all-zero weights,
    logged, when the others have no solution either."""
    alpha = np.zeros(gram.shape[0])
    active = np.flatnonzero(gram.diagonal() > 0)
    if active.size:
        try:
            alpha[active] = nash_weights(gram[np.ix_(active, active)])
            return alpha
        except NashSolveError as error:
            reason = str(error)
    else:
        reason = "every task gradient is zero"
    log.warning(
        "Nash-MTL: no bargaining solution (%s): the task gradients are Pareto stationary; "
        "no shared update this step",
        reason,
    )
    return alpha


class AlignedMTL(GramianMethod):
    """Aligned-MTL [Senushkin et al. 2023]: balance the Jacobian so that all its singular
    values equal the smallest one, Ĵ = B J with B = σ_min V Λ^{-1/2} Vᵀ (G = V Λ Vᵀ on its
    rank), and step along the sum of Ĵ's rows: w = B·1."""

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        eigenvalues, vectors = torch.linalg.eigh(gram)
        tolerance = eigenvalues.max() * gram.shape[0] * torch.finfo(gram.dtype).eps
        keep = eigenvalues > tolerance
        eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
        balance = eigenvalues.min().sqrt() * (vectors / eigenvalues.sqrt()) @ vectors.T
        return balance.sum(dim=0)


class UPGrad(GramianMethod):
    """Unconflicting projection of gradients [Quinton & Rey 2024, TorchJD]: project each g_i
    onto the dual cone of the task gradients and average. The projection of g_i is Jᵀv with
    v = argmin_{v ≥ e_i} vᵀGv, solved as non-negative least squares on a factor of G."""

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        g = gram.numpy()
        t = g.shape[0]
        eigenvalues, vectors = np.linalg.eigh(g)
        factor = (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))).T  # G = factorᵀ factor
        rows = []
        for i in range(t):
            lower = np.eye(t)[i]
            # v = lower + x, x ≥ 0: minimise |factor (lower + x)|²
            x, _ = nnls(factor, -factor @ lower)
            rows.append(lower + x)
        return torch.from_numpy(np.mean(rows, axis=0))
