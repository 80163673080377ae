"""ConFIG, conflict-free inverse gradients [Liu et al., arXiv 2408.11104], on the Gramian."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.checks import raise_first
from mtl.balancers.gramian import GramianMethod

#: Eigenvalues of the unit-gradient Gramian below this fraction of the largest are treated as
#: zero by the pseudo-inverse: above the ~1e-8 relative rounding of a Gramian formed from a
#: float32 Jacobian (mtl.balancers.jacobian.gramian), far below any real gradient geometry.
EIGENVALUE_CUTOFF = 1e-8


class ConFIG(GramianMethod):
    """ConFIG: the update direction v̂ has equal cosine with every task gradient (v = U⁺p for the
    unit gradients U, preference p = 1), and its length is the sum of the gradients' projections
    on it: d = (Σ_t g_tᵀv̂)·v̂ (``reduction: sum``, the paper and TorchJD; ``mean`` divides by T).

    Gramian form (exact, also for linearly dependent gradients): D = diag(‖g_t‖) (zero rows give
    zero unit rows), Ĝ = D⁻¹GD⁻¹, a = Ĝ⁺p, ‖v‖² = pᵀĜ⁺p, Σ_t g_tᵀv̂ = 1ᵀGD⁻¹a/‖v‖, hence
    d = Jᵀw with w = (Σ_t g_tᵀv̂ / ‖v‖)·D⁻¹a.
    """

    def __init__(self, reduction: str = "sum", mode: str = "param") -> None:
        super().__init__(mode)
        raise_first(self.config_problems({"reduction": reduction}, ()))
        self.reduction = reduction

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters, one line each (see mtl.balancers.checks)."""
        reduction = config.get("reduction", "sum")
        if reduction in ("sum", "mean"):
            return []
        return [f"balancer.reduction: {reduction!r}; expected sum or mean"]

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        t = gram.shape[0]
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        inverse_norms = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        unit_gram = gram * inverse_norms[:, None] * inverse_norms[None, :]
        eigenvalues, vectors = torch.linalg.eigh(unit_gram)
        keep = eigenvalues > EIGENVALUE_CUTOFF * eigenvalues.max().clamp_min(0.0)
        if not keep.any():
            return torch.zeros(t, dtype=gram.dtype)
        preference = torch.ones(t, dtype=gram.dtype)
        coordinates = vectors[:, keep].T @ preference
        a = vectors[:, keep] @ (coordinates / eigenvalues[keep])  # Ĝ⁺p
        norm_v = (preference @ a).clamp_min(0.0).sqrt()
        if norm_v == 0:
            return torch.zeros(t, dtype=gram.dtype)
        combination = inverse_norms * a  # v = Jᵀ D⁻¹ a
        length = (gram @ combination).sum() / norm_v
        weights = length / norm_v * combination
        return weights / t if self.reduction == "mean" else weights
