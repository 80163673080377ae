"""Priority-constrained descent (PCD, as in TorchJD 0.18): follow the primary task's gradient as
closely as possible while every other task still decreases at a guaranteed rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.checks import number_problems, raise_first
from mtl.balancers.gramian import GramianMethod


class PCD(GramianMethod):
    """PCD: with ĝ_t = s_t g_t, s_t = 1/√(v̂_t + ε) and v̂ the bias-corrected moving average of
    ‖g_t‖² (rate β), d̃ = argmin ½‖d − ĝ_p‖² s.t. ĝ_jᵀd ≥ τ‖ĝ_j‖² for every task j ≠ p (the
    primary task p); the update is d̃ rescaled to the norm of g_p. Infeasible constraints give
    g_p; a zero g_p gives 0; a non-finite Gramian gives nan weights without moving the average.

    The QP is solved in the coefficients c of d = Σ_k c_k ĝ_k (d lies in their span) with
    scipy's SLSQP (ftol 1e-12, as mtl's other QPs) — TorchJD uses a hand-written dual active-set
    method; both reach the unique d̃. The average is a buffer (saved in checkpoints), computed
    from the all-reduced Gramian (identical on every process), and moves once per optimiser
    step.

    Args:
        tasks: the task names, in loss order (given by `build_balancer`).
        primary: the primary task (default: the first of ``data.tasks``).
        tau: the guaranteed relative decrease of every other task, in [0, 1].
    """

    def __init__(
        self,
        tasks: Sequence[str],
        primary: str | None = None,
        tau: float = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        mode: str = "param",
    ) -> None:
        super().__init__(mode)
        tasks = list(tasks)
        config = {"primary": primary, "tau": tau, "beta": beta, "eps": eps}
        raise_first(self.config_problems(config, tasks))
        primary = tasks[0] if primary is None else primary
        self.primary, self.tau, self.beta, self.eps = tasks.index(primary), tau, beta, eps
        self.register_buffer("square_norm_average", torch.zeros(len(tasks), dtype=torch.float64))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("updated_step", torch.tensor(-1, dtype=torch.int64))

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters, one line each (see mtl.balancers.checks)."""
        problems = []
        primary = config.get("primary")
        if primary is not None and primary not in tasks:
            problems.append(
                f"balancer.primary: {primary!r}; expected one of data.tasks {list(tasks)} "
                "(or null: the first)"
            )
        rules = [
            ("tau", 0.02, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("beta", 0.999, lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("eps", 1e-8, lambda v: v >= 0, "a number >= 0"),
        ]
        return problems + number_problems(config, "balancer", rules)

    def _scales(self, square_norms: Tensor, step: int) -> Tensor:
        if int(self.updated_step) != step:
            average = self.beta * self.square_norm_average.cpu() + (1 - self.beta) * square_norms
            self.square_norm_average.copy_(average)
            self.num_updates += 1
            self.updated_step.fill_(step)
        unbiased = self.square_norm_average.cpu() / (1 - self.beta ** int(self.num_updates))
        denominators = (unbiased + self.eps).sqrt()
        return torch.where(denominators > 0, 1.0 / denominators, torch.zeros_like(denominators))

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        t = gram.shape[0]
        if not gram.isfinite().all():
            return torch.full((t,), torch.nan, dtype=torch.float64)
        scales = self._scales(gram.diagonal().clone(), context.step)
        p = self.primary
        weights = torch.zeros(t, dtype=torch.float64)
        if not gram[p, p] > 0:
            return weights
        scaled = (gram * scales[:, None] * scales[None, :]).numpy()
        coefficients = _closest_feasible(scaled, p, self.tau)
        square_norm = coefficients @ scaled @ coefficients
        # a direction that is zero up to rounding (relative to its parts) gives a zero update
        magnitude = (np.abs(coefficients) @ np.sqrt(np.clip(np.diag(scaled), 0, None))) ** 2
        if square_norm <= 1e-12 * magnitude:
            return weights
        return torch.from_numpy(coefficients) * scales * (gram[p, p] / square_norm).sqrt()


def _closest_feasible(gram: np.ndarray, primary: int, tau: float) -> np.ndarray:
    """Coefficients c of d = Σ_k c_k g_k minimising ½‖d − g_p‖² subject to
    g_jᵀd ≥ τ‖g_j‖² (j ≠ p); e_p when the constraints cannot all hold."""
    t = gram.shape[0]
    start = np.eye(t)[primary]
    others = [j for j in range(t) if j != primary]
    if not others:
        return start
    bounds = tau * np.diag(gram)[others]
    scale = max(float(np.max(np.diag(gram))), 1e-300)

    def objective(c: np.ndarray) -> float:
        return 0.5 * (c - start) @ gram @ (c - start) / scale

    result = minimize(
        objective,
        start,
        jac=lambda c: gram @ (c - start) / scale,
        method="SLSQP",
        constraints=(
            {
                "type": "ineq",
                "fun": lambda c: (gram[others] @ c - bounds) / scale,
                "jac": lambda c: gram[others] / scale,
            },
        ),
        options={"ftol": 1e-15, "maxiter": 500},
    )
    violation = np.max(bounds - gram[others] @ result.x) / scale
    return result.x if violation <= 1e-9 else start
