"""What a merging method is: a callable from the base weights and the task vectors to the
merged task vector (the merged model is ``θ₀ + merged``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from torch import Tensor

from mtl.merging.task_vectors import StateDict


class Merger(Protocol):
    """``merger(base, vectors) -> δ``: `base` is θ₀ (the merged tensors only), `vectors` the
    task vectors τ_t = θ_t − θ₀ in float32, δ the merged task vector added to θ₀. Methods that
    learn (AdaMerging) get data through other arguments of their own."""

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict: ...
