"""PCB-Merging (Du et al., NeurIPS 2024), after the authors' ``pcb-merging.py``.

Per task row of the stacked task vectors [T, D]:
1. clip |τ_t| to its (min_ratio, 1 − max_ratio) order statistics, signs kept;
2. intra-balancing exp(T · Norm(|τ_t|)²) times inter-balancing tanh(τ_t ⊙ Σ_j τ_j), Norm the
   row's min-max normalisation;
3. drop: the product clamped below its (1 − ratio) order statistic, then min-max normalised
   (dropped entries become 0): β̂_t;
4. θ = θ₀ + λ Σ_t β̂_t ⊙ τ_t / Σ_t β̂_t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl.merging.task_vectors import StateDict, stack, unflatten


def clamp_order(x: Tensor, low: float, high: float) -> Tensor:
    """Each row clamped between its ``int(d·low)``-th and ``int(d·(1 − high)) − 1``-th
    smallest values (0-based), as the reference code."""
    d = x.shape[-1]
    ordered = x.sort(dim=-1).values
    lo = ordered[..., int(d * low)].unsqueeze(-1)
    hi = ordered[..., max(int(d * (1 - high)) - 1, 0)].unsqueeze(-1)
    return torch.clamp(x, lo, hi)


def min_max(x: Tensor) -> Tensor:
    """Each row mapped to [0, 1] (a constant row to 0)."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp(min=1e-12)


class PCB:
    """Args:
    ratio: fraction of entries each task keeps after balancing (0.1; 0.05 in the vision script).
    scaling: λ for every task (1.2 in the vision script).
    clip: min_ratio = max_ratio of the outlier clipping (1e-4).
    """

    def __init__(self, ratio: float = 0.1, scaling: float = 1.2, clip: float = 1e-4) -> None:
        self.ratio, self.scaling, self.clip = float(ratio), float(scaling), float(clip)

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        rows = stack(vectors)
        magnitude = clamp_order(rows.abs(), self.clip, self.clip)
        clipped = torch.sign(rows) * magnitude
        intra = torch.exp(len(vectors) * min_max(magnitude) ** 2)
        inter = torch.tanh(rows * rows.sum(0))
        weight = min_max(clamp_order(intra * inter, 1 - self.ratio, 0.0))
        merged = (weight * clipped).sum(0) / weight.sum(0).clamp(min=1e-12)
        return unflatten(self.scaling * merged, vectors[0])
