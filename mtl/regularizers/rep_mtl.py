"""Rep-MTL (Wang, Li & Xu, ICCV 2025): regulating task saliency on the shared representation.

With S_t the saliency of task t (``[B, C, H, W]`` per feature level):

- TSR, task-specific saliency regulation: Ŝ_t = channel mean of S_t; per position i the task
  shares P_it = |Ŝ_it| / Σ_k |Ŝ_ik|; L_tsr = mean_i of the entropy -Σ_t P_it log P_it.
- CSA, cross-task saliency alignment: per sample b and task t the affinity M_tb = S_tb S_tbᵀ
  (C x C, S_tb as C x HW); the anchor A_b (C x T, the spatial means of every task's saliency)
  and Â_b = A_b A_bᵀ; positives cos(Â_b, M_tb), negatives cos(Â_b, Â_k) for the other samples
  k of the batch; L_csa = mean over b, t of -log(exp(pos/τ) / Σ_k≠b exp(neg_bk/τ)).

The cosines are formed without the C x C matrices: <X Xᵀ, Y Yᵀ>_F = ‖XᵀY‖²_F, so only T x T,
HW x T and min(C, HW)² products appear (torch has no such routine; written by hand).
Negatives are the samples of the process's own batch: under DDP the CSA term is that of each
process's batch, not of the global batch (TSR, a mean over positions, is exact).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from mtl.regularizers.base import RepresentationRegularizer

log = logging.getLogger(__name__)

#: Added to denominators of shares and cosines (zero saliencies).
EPS = 1e-12


class RepMTL(RepresentationRegularizer):
    """TSR and CSA on the task saliencies, per feature level, averaged over levels.

    Args:
        tsr_weight: λ_tsr, weight of the saliency-entropy term.
        csa_weight: λ_csa, weight of the contrastive alignment term.
        temperature: τ of the contrastive term.
        log_loss: saliencies of log L_t (the paper's choice) instead of L_t.
        levels: ``all`` (every feature level, averaged) or ``last``.
    """

    def __init__(
        self,
        tsr_weight: float = 0.9,
        csa_weight: float = 0.9,
        temperature: float = 0.1,
        log_loss: bool = True,
        levels: str = "all",
    ) -> None:
        super().__init__()
        if levels not in ("all", "last"):
            raise ValueError(f"regularizer.levels: {levels!r}; expected 'all' or 'last'")
        if temperature <= 0:
            raise ValueError(f"regularizer.temperature: {temperature}; expected a number > 0")
        self.tsr_weight = tsr_weight
        self.csa_weight = csa_weight
        self.temperature = temperature
        self.log_loss = log_loss
        self.levels = levels
        self._warned_single_sample = False

    def terms(self, saliencies: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
        chosen = saliencies[-1:] if self.levels == "last" else saliencies
        tsr = torch.stack([saliency_entropy(level) for level in chosen]).mean()
        terms = {"regularizer/tsr": self.tsr_weight * tsr}
        batch = chosen[0][0].shape[0]
        if self.csa_weight and batch >= 2:
            csa = torch.stack([saliency_alignment(level, self.temperature) for level in chosen])
            terms["regularizer/csa"] = self.csa_weight * csa.mean()
        elif self.csa_weight and not self._warned_single_sample:
            log.warning("Rep-MTL: a batch of one sample has no negatives; the CSA term is left out")
            self._warned_single_sample = True
        return terms


def saliency_entropy(saliencies: Sequence[Tensor]) -> Tensor:
    """L_tsr: the mean over positions of the entropy of the tasks' shares of |channel-mean
    saliency| (`saliencies`: one ``[B, C, ...]`` tensor per task)."""
    magnitude = torch.stack([s.mean(dim=1) for s in saliencies]).abs()  # T x B x ...
    magnitude = magnitude / _scale(magnitude)  # shares are scale-free; EPS becomes relative
    shares = magnitude / (magnitude.sum(dim=0, keepdim=True) + EPS)
    return -(shares * torch.log(shares + EPS)).sum(dim=0).mean()


def saliency_alignment(saliencies: Sequence[Tensor], temperature: float) -> Tensor:
    """L_csa: the contrastive loss of each task's saliency affinity against its sample's
    anchor, with the other samples' anchors as negatives (`saliencies`: ``[B, C, ...]`` per
    task; needs B >= 2)."""
    s = torch.stack([x.flatten(2) for x in saliencies], dim=1)  # B x T x C x N
    # Every cosine below is unchanged by one factor per sample; saliencies are tiny (the
    # losses are means over pixels), so bring each sample to unit norm before adding EPS.
    s = s / _scale(s.flatten(1), dim=1).view(-1, 1, 1, 1)
    anchors = s.mean(dim=3)  # B x T x C (A_bᵀ)
    # cos(vec(A_b A_bᵀ), vec(M_tb)) = ‖S_tbᵀ A_b‖² / (‖A_bᵀ A_b‖ ‖S_tbᵀ S_tb‖ or ‖S_tb S_tbᵀ‖)
    cross = torch.einsum("btcn,bkc->btnk", s, anchors).pow(2).sum(dim=(2, 3))  # B x T
    anchor_gram = anchors @ anchors.transpose(1, 2)  # B x T x T
    anchor_norm = anchor_gram.flatten(1).norm(dim=1)  # ‖Â_b‖_F
    channels, positions = s.shape[2], s.shape[3]
    # B x T x C x C, or B x T x N x N when smaller: the same Frobenius norm
    affinity = s @ s.transpose(2, 3) if channels <= positions else s.transpose(2, 3) @ s
    affinity_norm = affinity.flatten(2).norm(dim=2)  # B x T
    positive = cross / (anchor_norm[:, None] * affinity_norm + EPS)
    # cos(Â_b, Â_k) = ‖A_bᵀ A_k‖² / (‖Â_b‖ ‖Â_k‖)
    between = torch.einsum("btc,kuc->bktu", anchors, anchors).pow(2).sum(dim=(2, 3))  # B x B
    negative = between / (anchor_norm[:, None] * anchor_norm[None, :] + EPS)
    others = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    denominator = torch.logsumexp(
        (negative / temperature).masked_fill(~others, float("-inf")), dim=1
    )  # B
    return (denominator[:, None] - positive / temperature).mean()


def _scale(values: Tensor, dim: int | None = None) -> Tensor:
    """The largest magnitude (over `dim`, or all), detached, and 1 where it is 0: a divisor
    that leaves scale-free quantities and their gradients unchanged."""
    largest = values.detach().abs().amax() if dim is None else values.detach().abs().amax(dim=dim)
    return torch.where(largest > 0, largest, torch.ones_like(largest))
