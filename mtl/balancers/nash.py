"""The Nash bargaining weights of Nash-MTL [Navon et al. 2022]: α > 0 with α_i (Gα)_i = 1.

The equation is the stationarity condition ∇f(α) = Gα − 1/α = 0 of the convex function
f(α) = ½αᵀGα − Σ_i log α_i on α > 0 (strictly convex: its Hessian G + diag(1/α²) is positive
definite). So the solution is unique when it exists, and it exists exactly when no non-zero
combination Σ v_i g_i with v ≥ 0 vanishes, i.e. when the task gradients are not Pareto
stationary; linearly independent gradients suffice, and a rank-deficient G can still have one
(g_3 = g_1 + g_2 does). When it does not exist (a task without gradient, or exactly opposed
tasks), f decreases without bound along that v and no weights satisfy the equation.

Written by hand: it is a T x T problem (T = number of tasks) solved once per step, which
damped Newton finishes in about 7 iterations (under a millisecond, against T backward passes).
f is self-concordant (a quadratic plus a log barrier), so damped Newton with a backtracking line
search converges from any start, quadratically near the solution; no warm start is needed. The
authors' code instead runs up to 20 linearised convex programs through cvxpy/ECOS, warm-started
from the previous step: a heavy dependency, and a loop that can stop before the equation holds.
"""

from __future__ import annotations

import numpy as np

#: Largest accepted max_i |α_i (Gα)_i − 1|. Gramians that cannot meet it hold gradients that
#: cancel to about float32 precision (e.g. two with cosine −1 + 1e-10), i.e. Pareto stationary
#: as far as float32 gradients can tell; well-posed ones reach about 1e-12.
TOLERANCE = 1e-6


class NashSolveError(ArithmeticError):
    """No weights satisfy the bargaining equation to `TOLERANCE`: the task gradients are
    (numerically) Pareto stationary."""


def bargaining_residual(gram: np.ndarray, alpha: np.ndarray) -> float:
    """max_i |α_i (Gα)_i − 1|."""
    return float(np.max(np.abs(alpha * (gram @ alpha) - 1.0)))


def nash_weights(gram: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """The α > 0 with α_i (Gα)_i = 1 for every i, on the unnormalised Gramian G (float64).

    Raises:
        NashSolveError: when no such α exists to `TOLERANCE` (including a task with a zero
            gradient, and any non-finite entry of G).
    """
    gram = np.asarray(gram, dtype=np.float64)
    diagonal = gram.diagonal()
    if not np.isfinite(gram).all() or not (diagonal > 0).all():
        raise NashSolveError(f"a task gradient is zero or not finite (diag G = {diagonal})")
    # The equation is invariant under α = Dβ, G → DGD with D diagonal: solve on the matrix of
    # cosines (unit diagonal), so tasks whose gradient norms differ by orders of magnitude are
    # as well conditioned as equal ones.
    scale = 1.0 / np.sqrt(diagonal)
    cosines = gram * scale[:, None] * scale[None, :]
    beta = _newton(cosines, max_iter)
    alpha = scale * beta
    residual = bargaining_residual(gram, alpha)
    if not residual <= TOLERANCE:
        raise NashSolveError(f"max_i |α_i (Gα)_i − 1| = {residual:.3g} on G")
    return alpha


def _objective(gram: np.ndarray, x: np.ndarray) -> float:
    return 0.5 * x @ gram @ x - np.log(x).sum()


def _newton(gram: np.ndarray, max_iter: int) -> np.ndarray:
    """Damped Newton on f(x) = ½xᵀGx − Σ log x, x > 0, from x = 1; returns the last iterate
    (the caller checks the residual)."""
    x = np.ones(gram.shape[0])
    for _ in range(max_iter):
        gx = gram @ x
        if np.max(np.abs(x * gx - 1.0)) <= 1e-13:
            break
        gradient = gx - 1.0 / x
        hessian = gram + np.diag(1.0 / x**2)  # positive definite for every x > 0
        try:
            step = -np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            break  # x has run off to where 1/x² vanishes against G: no solution
        decrement = float(np.sqrt(max(-(gradient @ step), 0.0)))  # Newton decrement λ
        if not decrement >= 1e-12:
            break  # at the minimum to float64 precision (or lost to overflow: NaN)
        if decrement < 0.25:
            # f is self-concordant: for λ < 1 the full step stays in x > 0 and λ⁺ ≤ (λ/(1−λ))²
            # (quadratic convergence); a line search there would only fight round-off.
            t = 1.0
        else:
            # Longest step that keeps x > 0 (with a margin), then backtrack to sufficient decrease.
            t = 1.0
            shrinking = step < 0
            if shrinking.any():
                t = min(t, 0.99 * float(np.min(-x[shrinking] / step[shrinking])))
            value = _objective(gram, x)
            for _ in range(60):
                if _objective(gram, x + t * step) <= value - 0.25 * t * decrement**2:
                    break
                t *= 0.5
            else:
                break  # no decrease representable in float64
        x = x + t * step
    return x
