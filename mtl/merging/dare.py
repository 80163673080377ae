"""DARE (Yu et al., ICML 2024): drop each entry of every τ_t with probability p and rescale
the rest by 1/(1 − p), then merge with another method (Task Arithmetic or TIES)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl.merging.base import Merger
from mtl.merging.task_vectors import MergeError, StateDict


def drop_and_rescale(
    vectors: Sequence[Mapping[str, Tensor]], p: float, rescale: bool, seed: int
) -> list[StateDict]:
    """The DARE-sparsified task vectors; one generator seeded with `seed` draws the masks,
    task after task, tensor after tensor (reproducible)."""
    if not 0.0 <= p < 1.0:
        raise MergeError(f"method.p: {p}; expected a drop probability in [0, 1)")
    generator = torch.Generator().manual_seed(int(seed))
    out = []
    for vector in vectors:
        dropped = {}
        for name, v in vector.items():
            keep = torch.rand(v.shape, generator=generator) >= p
            dropped[name] = v * keep / (1.0 - p) if rescale else v * keep
        out.append(dropped)
    return out


class Dare:
    """Args:
    merge: the method applied to the sparsified vectors (a merger config, e.g. TIES).
    p: drop probability (FusionBench 0.5; the paper's example 0.9).
    rescale: divide the kept entries by 1 − p.
    seed: seed of the drop masks.
    """

    def __init__(self, merge: Merger, p: float = 0.5, rescale: bool = True, seed: int = 0) -> None:
        self.merge, self.p, self.rescale, self.seed = merge, float(p), bool(rescale), int(seed)

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        return self.merge(base, drop_and_rescale(vectors, self.p, self.rescale, self.seed))
