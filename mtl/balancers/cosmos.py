"""COSMOS [Ruchte & Grabocka, ICDM 2021] as a scalariser (TorchJD ``COSMOS``): the linear
scalarisation by the preference r minus λ times the cosine similarity of r and the loss vector,
Σ_t r_t L_t − λ·cos(r, L).

Gradient weights r − λ[r/(‖r‖‖L‖) − (rᵀL)L/(‖r‖‖L‖³)]: the cosine term turns the loss vector
toward r, so a weight can be negative (the update raises a loss that is small relative to its
preference). The full method also feeds r to the model (input concatenation); that is a model
change, not part of this scalariser: without it a model learns one trade-off, so the default
preference is fixed (uniform).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.scalariser import PreferenceScalariser

#: lower bound of the norms in the cosine (as torch.nn.functional.cosine_similarity)
EPSILON = 1e-8


class COSMOS(PreferenceScalariser):
    """Σ_t r_t L_t − λ·cos(r, L).

    Args:
        num_tasks: T.
        lambda_: weight λ ≥ 0 of the cosine term (the paper uses 0.01 to 8 by dataset).
        preference: ``uniform`` (1/T each), ``dirichlet`` (drawn every step) or T
            non-negative numbers.
    """

    def __init__(
        self,
        num_tasks: int,
        lambda_: float = 1.0,
        preference: str | Sequence[float] = "uniform",
        mode: str = "param",
    ) -> None:
        super().__init__(num_tasks, preference, mode)
        if lambda_ < 0:
            raise ValueError(f"balancer.lambda_={lambda_}; expected a non-negative number")
        self.lambda_ = float(lambda_)

    def scalarise(self, losses: Tensor, context: BalanceContext) -> Tensor:
        r = self.preference(context)
        cosine = (r @ losses) / (r.norm().clamp_min(EPSILON) * losses.norm().clamp_min(EPSILON))
        return r @ losses - self.lambda_ * cosine
