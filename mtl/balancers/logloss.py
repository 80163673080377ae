"""Log-loss weighting, the scale-invariant baseline of Nash-MTL [Navon et al. 2022].

f(L) = Σ_t log(L_t + ε), so ∇f = Σ_t ∇L_t / (L_t + ε): every task's gradient is divided by its
own loss, which makes the update invariant to a rescaling of any one loss. Losses must be
non-negative; ε keeps the weight finite as a loss approaches 0.
"""

from __future__ import annotations

from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.scalariser import Scalariser


class LogLoss(Scalariser):
    """Σ_t log(L_t + ε); gradient weights 1 / (L_t + ε).

    Args:
        eps: added to every loss inside the log. 1e-8 as in MTMamba++'s log-loss and DB-MTL's
            log-gradients; the nash-mtl baseline uses none (``eps: 0``).
    """

    def __init__(self, eps: float = 1e-8, mode: str = "param") -> None:
        super().__init__(mode)
        if eps < 0:
            raise ValueError(f"balancer.eps={eps}; expected a non-negative number")
        self.eps = eps

    def scalarise(self, losses: Tensor, context: BalanceContext) -> Tensor:
        return (losses + self.eps).log().sum()
