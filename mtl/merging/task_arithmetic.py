"""Task Arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ Σ_t τ_t."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from mtl.merging.task_vectors import StateDict, scale, total


class TaskArithmetic:
    """Args:
    scaling: λ (FusionBench 0.3; the papers search 0.1 ... 1.0 on validation).
    """

    def __init__(self, scaling: float = 0.3) -> None:
        self.scaling = float(scaling)

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        return scale(total(vectors), self.scaling)
