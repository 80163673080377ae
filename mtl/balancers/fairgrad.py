"""FairGrad [Ban & Ji, ICML 2024]: α-fair resource allocation between the tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.checks import number_problems, raise_first
from mtl.balancers.gramian import GramianMethod


class FairGrad(GramianMethod):
    """FairGrad: the weights w > 0 with (G w)_t = w_t^(−1/α) for every task t; update Jᵀw.

    The solution is the unique minimiser of the strictly convex ½wᵀGw − Σ_t h(w_t) with
    h' = w^(−1/α) (for α = 1 this is the Nash-MTL equation on the unnormalised G), so it exists
    and is unique when the task gradients are linearly independent. As in the references, G is
    not normalised: ‖d‖² = Σ_t w_t^(1−1/α), which is T for α = 1 whatever the gradients' scale.
    α = 0 is linear scalarisation with weights 1/T.

    The references (LibMTL, TorchJD) call scipy's ``least_squares`` on Gw − w^(−1/α) with the
    bound w ≥ 0, from w = 1/T on the raw Gramian; least squares on that residual (or on its
    log-space form) can stall or diverge when the gradients conflict strongly or differ in scale
    by orders of magnitude. The convex form has a closed-form Hessian G + (1/α)·diag(w^(−1/α−1)),
    so a damped Newton method (written here: no library minimises a smooth convex function
    over w > 0 with a given Hessian more simply) solves it to machine precision in a few
    iterations from w = 1/T. It runs on Ĝ = G/s, s the mean diagonal, and maps back exactly:
    w_G = s^(−α/(1+α)) w_Ĝ. Without a solution (linearly dependent gradients that cancel,
    e.g. g_2 = −g_1) the weights of the cancelling tasks grow without bound while the update
    converges; the iterates stop at a cap, giving that limit update (and large weights).
    """

    def __init__(self, alpha: float = 1.0, mode: str = "param") -> None:
        super().__init__(mode)
        raise_first(self.config_problems({"alpha": alpha}, ()))
        self.alpha = alpha

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters, one line each (see mtl.balancers.checks)."""
        rules = [("alpha", 1.0, lambda v: v >= 0, "a number >= 0")]
        return number_problems(config, "balancer", rules)

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        t = gram.shape[0]
        if self.alpha == 0:
            return torch.full((t,), 1.0 / t, dtype=torch.float64)
        g = gram.numpy()
        scale = float(np.mean(np.diag(g)))
        if not scale > 0:  # all gradients zero: any weights give a zero update
            return torch.full((t,), 1.0 / t, dtype=torch.float64)
        w = _newton(g / scale, 1.0 / self.alpha)
        return torch.from_numpy(w * scale ** (-self.alpha / (1.0 + self.alpha)))


def _newton(g: np.ndarray, power: float, max_iters: int = 100, cap: float = 1e6) -> np.ndarray:
    """Minimise f(w) = ½wᵀGw − Σ_t h(w_t), h' = w^(−power), over w > 0 by damped Newton.

    On a Gramian with unit mean diagonal the solution is of order one; when none exists (f
    unbounded below: linearly dependent gradients that cancel, e.g. g_2 = −g_1) the iterates
    would grow without bound, so they stop at ``cap``: the cancelling part of Jᵀw then stays
    a rounding error times ``cap`` instead of overflowing.
    """

    def objective(w: np.ndarray) -> float:
        h = np.log(w) if power == 1 else w ** (1 - power) / (1 - power)
        return 0.5 * w @ g @ w - h.sum()

    w = np.full(g.shape[0], 1.0 / g.shape[0])
    value = objective(w)
    for _ in range(max_iters):
        gradient = g @ w - w**-power
        hessian = g + np.diag(power * w ** (-power - 1))
        step = -np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        decrement = -gradient @ step  # Newton decrement²: f − min f ≈ decrement / 2
        if decrement < 1e-24 * max(abs(value), 1.0):
            break
        size = 1.0
        while (
            np.any(w + size * step <= 0)
            or np.any(w + size * step > cap)
            or (objective(w + size * step) > value - 0.25 * size * decrement)
        ):
            size /= 2
            if size < 1e-20:
                return w
        w = w + size * step
        value = objective(w)
    return w
