"""LiNeS (Wang, Dimitriadis et al., ICLR 2025): scale a merged task vector layer by layer,
λ(ℓ) = α + β·ℓ/(L − 1) for blocks ℓ = 0 … L − 1, α outside the blocks (embeddings, norms).

Blocks are found in the timm parameter names and numbered globally: ViT ``blocks.{i}.``,
Swin ``layers.{s}.blocks.{i}.`` and ConvNeXt ``stages.{s}.blocks.{i}.`` (stage-major),
ResNet ``layer{s}.{i}.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor

from mtl.merging.base import Merger
from mtl.merging.task_vectors import MergeError, StateDict, total

#: (stage, block) in a parameter name, most specific first.
_BLOCK_PATTERNS = (
    re.compile(r"(?:^|\.)(?:layers|stages)[._](\d+)\.blocks\.(\d+)\."),
    re.compile(r"(?:^|\.)layer(\d+)\.(\d+)\."),
    re.compile(r"(?:^|\.)()blocks\.(\d+)\."),
)


def block_index(names: Sequence[str]) -> tuple[dict[str, int], int]:
    """The global block index of every name inside a block, and the number of blocks L."""
    found: dict[str, tuple[int, int]] = {}
    for name in names:
        for pattern in _BLOCK_PATTERNS:
            match = pattern.search(name)
            if match:
                found[name] = (int(match.group(1) or 0), int(match.group(2)))
                break
    order = {block: i for i, block in enumerate(sorted(set(found.values())))}
    return {name: order[block] for name, block in found.items()}, len(order)


class LiNeS:
    """Args:
    merge: the method whose merged vector is scaled (TA, TIES, Consensus; its scaling applies).
    alpha: scale of the first block and of everything outside the blocks; null: the paper's
        multi-task choice (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T.
    beta: increase of the scale from the first to the last block.
    """

    def __init__(self, merge: Merger, alpha: float | None = None, beta: float = 0.5) -> None:
        self.merge, self.alpha, self.beta = merge, alpha, float(beta)

    def scales(self, names: Sequence[str], alpha: float) -> dict[str, float]:
        index, blocks = block_index(names)
        if blocks == 0 and self.beta != 0:
            raise MergeError(
                "method.beta: the encoder has no numbered blocks (blocks.N, layers.S.blocks.N, "
                "layerS.N), so LiNeS has no depth to scale by; set method.beta=0"
            )
        step = self.beta / (blocks - 1) if blocks > 1 else 0.0
        return {n: alpha + step * index[n] if n in index else alpha for n in names}

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        merged = self.merge(base, vectors)
        alpha = self.alpha
        if alpha is None:
            norm = sum(float(v.abs().sum()) for v in merged.values())
            summed = sum(float(v.abs().sum()) for v in total(vectors).values())
            alpha = summed / max(norm, 1e-12) / len(vectors)
        factors = self.scales(list(merged), float(alpha))
        return {k: factors[k] * v for k, v in merged.items()}
