"""Weight averaging: θ = (1/T) Σ_t θ_t, i.e. θ₀ + (1/T) Σ_t τ_t."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from mtl.merging.task_vectors import StateDict, scale, total


class WeightAveraging:
    """The plain mean of the fine-tuned weights."""

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        return scale(total(vectors), 1.0 / len(vectors))
