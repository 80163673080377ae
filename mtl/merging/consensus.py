"""TALL masks and Consensus merging (Wang, Dimitriadis et al., ICML 2024), as the authors'
code defines them (FusionBench compares |θ₀ − τ_t| instead of |τ_t|, mixing weights and
deltas).

- τ_MTL: the multi-task vector of a base method (Task Arithmetic with λ = 1: Σ_t τ_t; or TIES).
- TALL mask of task t: m_t = 1[|τ_t| > λ_t |τ_MTL − τ_t|].
- Consensus: keep the entries at least k tasks use, θ = θ₀ + α (1[Σ_t m_t ≥ k] ⊙ τ_MTL);
  k = 0 is the base method, k = 1 drops only the weights no task uses.
- Compression: τ_MTL plus one bit-packed mask per task rebuilds each task's model
  θ̂_t = θ₀ + m_t ⊙ τ_MTL (`pack_masks`, `reconstruct`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mtl.merging.base import Merger
from mtl.merging.task_vectors import MergeError, StateDict, flatten, unflatten


def tall_masks(
    vectors: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor], lambdas: Sequence[float]
) -> list[StateDict]:
    """m_t = 1[|τ_t| > λ_t |τ_MTL − τ_t|] per task (boolean tensors)."""
    return [
        {k: v.abs() > lam * (merged[k] - v).abs() for k, v in vector.items()}
        for vector, lam in zip(vectors, lambdas, strict=True)
    ]


def pack_masks(masks: Sequence[Mapping[str, Tensor]]) -> list[np.ndarray]:
    """Each task's mask as packed bits (``np.packbits`` of the flattened mask)."""
    return [np.packbits(flatten(m).numpy().astype(bool)) for m in masks]


def reconstruct(
    base: Mapping[str, Tensor], merged: Mapping[str, Tensor], packed: np.ndarray
) -> StateDict:
    """θ̂_t = θ₀ + m_t ⊙ τ_MTL from the merged vector and one packed mask."""
    size = sum(v.numel() for v in merged.values())
    mask = unflatten(torch.from_numpy(np.unpackbits(packed)[:size].astype(bool)), merged)
    return {k: (base[k].float() + mask[k] * merged[k]).to(base[k].dtype) for k in base}


class Consensus:
    """Args:
    merge: the base method giving τ_MTL (its own scaling applies; 1 as in the paper).
    k: minimum number of tasks whose TALL mask keeps an entry (paper: 2).
    mask_lambda: λ_t of the TALL masks, one value for all tasks or one per task (0.2 ... 0.6).
    scaling: α applied to the consensus vector.
    """

    def __init__(
        self,
        merge: Merger,
        k: int = 2,
        mask_lambda: float | Sequence[float] = 0.4,
        scaling: float = 0.3,
    ) -> None:
        self.merge, self.k, self.scaling = merge, int(k), float(scaling)
        self.mask_lambda = mask_lambda

    def lambdas(self, tasks: int) -> list[float]:
        if isinstance(self.mask_lambda, (int, float)):
            return [float(self.mask_lambda)] * tasks
        values = [float(v) for v in self.mask_lambda]
        if len(values) != tasks:
            raise MergeError(
                f"method.mask_lambda: {len(values)} values for {tasks} tasks; give one per "
                "checkpoint or a single number"
            )
        return values

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        merged = self.merge(base, vectors)
        masks = tall_masks(vectors, merged, self.lambdas(len(vectors)))
        return {
            k: self.scaling * v * (torch.stack([m[k] for m in masks]).sum(0) >= self.k)
            for k, v in merged.items()
        }
