"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

1. trim: each τ_t keeps its top-k magnitudes (over the whole vector, or per tensor);
2. elect: γ = sign(Σ_t τ̂_t), entries where the sum is 0 take the majority sign of the whole
   summed vector;
3. disjoint merge: per entry, only the τ̂_t whose sign equals γ: their mean ("mean", the
   paper; λ about 1) or their sum ("sum", FusionBench and AdaMerging; λ = 0.3). A λ tuned for
   one aggregation is a T-fold scale error for the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl.merging.task_vectors import MergeError, StateDict, stack, trim, unflatten


def elect_and_merge(rows: Tensor, aggregate: str) -> Tensor:
    """Steps 2 and 3 on trimmed task vectors stacked as [T, D]; returns the merged [D]."""
    summed = rows.sum(0)
    sign = torch.sign(summed)
    sign[sign == 0] = torch.sign(sign.sum())  # the majority sign, as the paper's code
    agree = torch.where(sign > 0, rows > 0, rows < 0)
    selected = rows * agree
    if aggregate == "sum":
        return selected.sum(0)
    if aggregate == "mean":
        return selected.sum(0) / agree.sum(0).clamp(min=1)
    raise MergeError(f"aggregate: '{aggregate}'; expected 'sum' or 'mean'")


class Ties:
    """Args:
    k: fraction of each task vector's entries kept by magnitude (0.2 = the papers' 20%).
    scaling: λ applied to the merged vector.
    aggregate: ``sum`` (disjoint sum) or ``mean`` (disjoint mean).
    trim: ``global`` (one ranking over the whole vector, as the paper) or ``tensor``.
    """

    def __init__(
        self, k: float = 0.2, scaling: float = 0.3, aggregate: str = "sum", trim: str = "global"
    ) -> None:
        if aggregate not in ("sum", "mean"):
            raise MergeError(f"method.aggregate: '{aggregate}'; expected 'sum' or 'mean'")
        if trim not in ("global", "tensor"):
            raise MergeError(f"method.trim: '{trim}'; expected 'global' or 'tensor'")
        self.k, self.scaling, self.aggregate, self.trim = float(k), float(scaling), aggregate, trim

    def merged(self, vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
        """The unscaled TIES vector τ_m."""
        trimmed = trim(vectors, self.k, self.trim)
        return unflatten(elect_and_merge(stack(trimmed), self.aggregate), vectors[0])

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        return {k: self.scaling * v for k, v in self.merged(vectors).items()}
