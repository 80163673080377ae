"""Penalty-based boundary intersection [Zhang & Li, MOEA/D, IEEE TEC 2007] as a scalariser
(TorchJD ``PBI``): with f = L − z*, the unit preference direction ŵ = p/‖p‖, the distance
along it d₁ = fᵀŵ and the distance to it d₂ = ‖f − d₁ŵ‖, minimise d₁ + θ·d₂.

Gradient weights ŵ + θ(f − d₁ŵ)/d₂: the θ term pulls the losses onto the preference ray, so
some weights are negative (the update raises those losses). A Pareto-front tool: drawn every step,
the preference spreads the trade-offs; the default (uniform) is one trade-off for one model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.scalariser import PreferenceScalariser

#: added under the square root of d₂ (TorchJD: keeps the gradient finite on the ray)
EPSILON = 1e-12


class PBI(PreferenceScalariser):
    """d₁ + θ·d₂ of the losses relative to the reference point along the preference.

    Args:
        num_tasks: T.
        theta: penalty θ ≥ 0 on the distance to the preference ray (MOEA/D: 5).
        preference: ``uniform`` (1/T each), ``dirichlet`` (drawn every step) or T
            non-negative numbers.
        reference: the ideal point z* (T numbers; null: 0, for non-negative losses).
    """

    def __init__(
        self,
        num_tasks: int,
        theta: float = 5.0,
        preference: str | Sequence[float] = "uniform",
        reference: Sequence[float] | None = None,
        mode: str = "param",
    ) -> None:
        super().__init__(num_tasks, preference, mode)
        if theta < 0:
            raise ValueError(f"balancer.theta={theta}; expected a non-negative number")
        self.theta = float(theta)
        if reference is not None and len(reference) != num_tasks:
            raise ValueError(
                f"balancer.reference: {len(reference)} numbers; expected one per task ({num_tasks})"
            )
        self.reference = torch.tensor(
            [0.0] * num_tasks if reference is None else [float(v) for v in reference],
            dtype=torch.float64,
        )

    def scalarise(self, losses: Tensor, context: BalanceContext) -> Tensor:
        shifted = losses - self.reference
        direction = self.preference(context)
        direction = direction / direction.norm()
        along = shifted @ direction
        across = shifted - along * direction
        return along + self.theta * (across @ across + EPSILON).sqrt()
