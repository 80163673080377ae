"""DualProj [GEM, Lopez-Paz & Ranzato 2017, Eq. 11; as in TorchJD]: project the averaged
gradient onto the dual cone of the task gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.checks import raise_first
from mtl.balancers.gramian import GramianMethod


def dual_cone_weights(gram: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """The weights v of the projection Jᵀv of Jᵀu onto the dual cone {x : Jx ≥ 0}:
    v = argmin_{v ≥ u} vᵀGv (the dual of the projection, Quinton & Rey 2024, Prop. 1).

    Solved exactly as non-negative least squares on a factor F of G = FᵀF: with v = u + x,
    x ≥ 0, minimise ‖F(u + x)‖².
    """
    eigenvalues, vectors = np.linalg.eigh(gram)
    factor = (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))).T
    x, _ = nnls(factor, -factor @ lower)
    return lower + x


class DualProj(GramianMethod):
    """DualProj: d = Jᵀw with w = argmin_{v ≥ p} vᵀGv, the projection of Jᵀp onto the dual cone
    of the task gradients: the closest update to the preferred combination that conflicts with
    no task (Jd ≥ 0). p = 1/T (``reduction: mean``, TorchJD's default) or 1 (``sum``; T times
    the update, the projection being positively homogeneous).

    TorchJD solves the same QP with quadprog on G/tr(G) + 1e-4·I; here it is solved without
    regularisation, which moves the weights by O(1e-4) relative.
    """

    def __init__(self, reduction: str = "mean", mode: str = "param") -> None:
        super().__init__(mode)
        raise_first(self.config_problems({"reduction": reduction}, ()))
        self.reduction = reduction

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters, one line each (see mtl.balancers.checks)."""
        reduction = config.get("reduction", "mean")
        if reduction in ("sum", "mean"):
            return []
        return [f"balancer.reduction: {reduction!r}; expected sum or mean"]

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        t = gram.shape[0]
        lower = np.full(t, 1.0 / t if self.reduction == "mean" else 1.0)
        return torch.from_numpy(dual_cone_weights(gram.numpy(), lower))
