"""Model Breadcrumbs (Davari & Belilovsky, 2023): per task, keep the entries of τ_t whose
magnitude lies between the β and γ quantiles (dropping the smallest and the outliers), then
θ = θ₀ + α Σ_t m_t ⊙ τ_t.

Entries are ranked, so a tensor too small for the top fraction to hold one entry
(numel·(1 − γ) < 1) loses no outlier instead of losing everything, as mergekit's per-tensor
slice ``sorted[n_bottom:-n_top]`` does when ``n_top = 0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl.merging.task_vectors import MergeError, StateDict, count, flatten, total, unflatten


def band_mask(x: Tensor, beta: float, gamma: float) -> Tensor:
    """True for the entries of 1-D `x` ranked (by magnitude, ascending) in
    ``[int(β·n), n − int((1 − γ)·n))``."""
    n = x.numel()
    low, high = count(beta, n), n - count(1.0 - gamma, n)
    rank = torch.empty(n, dtype=torch.long)
    rank[x.abs().argsort(stable=True)] = torch.arange(n)
    return (rank >= low) & (rank < high)


class Breadcrumbs:
    """Args:
    beta: fraction of the smallest magnitudes dropped (mttl 0.9).
    gamma: quantile above which magnitudes are outliers and dropped (mttl 0.99: the top 1%).
    scaling: α (mttl 0.4).
    scope: ``global`` (ranked over each task's whole vector, as mttl) or ``tensor``.
    """

    def __init__(
        self, beta: float = 0.9, gamma: float = 0.99, scaling: float = 0.4, scope: str = "global"
    ) -> None:
        if not 0.0 <= beta <= gamma <= 1.0:
            raise MergeError(
                f"method.beta {beta}, method.gamma {gamma}: need 0 <= beta <= gamma <= 1"
            )
        if scope not in ("global", "tensor"):
            raise MergeError(f"method.scope: '{scope}'; expected 'global' or 'tensor'")
        self.beta, self.gamma, self.scaling, self.scope = (
            float(beta),
            float(gamma),
            float(scaling),
            scope,
        )

    def masked(self, vector: Mapping[str, Tensor]) -> StateDict:
        if self.scope == "global":
            flat = flatten(vector)
            return unflatten(flat * band_mask(flat, self.beta, self.gamma), vector)
        return {
            k: v * band_mask(v.reshape(-1), self.beta, self.gamma).reshape(v.shape)
            for k, v in vector.items()
        }

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        summed = total([self.masked(v) for v in vectors])
        return {k: self.scaling * v for k, v in summed.items()}
