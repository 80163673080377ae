"""Saliency maxF and IoU in the two definitions found in the multi-task literature.

Both take the raw logit [B,1,H,W] and a {0,1} target with 255 = ignore; probabilities are
``sigmoid(logit)``, applied once. Hand-written because the two benchmark protocols (counts over
the dataset vs. per-image averages, β, threshold sets, ≥ vs >) are not torchmetrics metrics.

- A (ATRC, InvPT): thresholds 0.05..0.95 (19), a pixel is salient when ``p >= t``; TP, predicted
  and actual positives summed over the dataset; F_β with β² = 0.3; maxF = max over thresholds;
  IoU_t = TP / (predicted + actual − TP) from the same sums.
- B (MTI-Net, MTLoRA, M3ViT): thresholds linspace(0.2, 0.9, 15), salient when ``p > t``;
  per-image precision, recall and Jaccard averaged over images; F with β = 1 from the mean
  precision and mean recall; maxF and mIoU = max over thresholds.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

IGNORE_INDEX = 255
THRESHOLDS_A = tuple(round(0.05 * i, 2) for i in range(1, 20))
THRESHOLDS_B = tuple(torch.linspace(0.2, 0.9, 15, dtype=torch.float64).tolist())


def _probabilities_and_valid(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened-per-image probabilities, binary targets and validity masks, each [B, N]."""
    probs = torch.sigmoid(preds.detach().double()).flatten(1)
    target = target.flatten(1)
    valid = target != IGNORE_INDEX
    return probs, target == 1, valid


class SaliencyDatasetF(Metric):
    """Definition A: counts summed over the dataset, F_β (β² = 0.3), thresholds ``p >= t``."""

    full_state_update = False

    def __init__(
        self, thresholds: tuple[float, ...] = THRESHOLDS_A, beta_sq: float = 0.3, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.register_buffer(
            "thresholds", torch.tensor(thresholds, dtype=torch.float64), persistent=False
        )
        self.beta_sq = beta_sq
        k = len(thresholds)
        for name in ("true_pos", "pred_pos", "actual_pos"):
            self.add_state(name, torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        probs, positive, valid = _probabilities_and_valid(preds, target)
        probs, positive = probs[valid], positive[valid]
        predicted = probs[:, None] >= self.thresholds.to(probs.device)  # [N, K]
        self.true_pos += (predicted & positive[:, None]).sum(0)
        self.pred_pos += predicted.sum(0)
        self.actual_pos += positive.sum()

    def compute(self) -> dict[str, Tensor]:
        tp, pred_pos, actual = self.true_pos.double(), self.pred_pos.double(), self.actual_pos
        precision = tp / pred_pos.clamp_min(1)
        recall = tp / actual.double().clamp_min(1)
        denom = self.beta_sq * precision + recall
        f = torch.where(denom > 0, (1 + self.beta_sq) * precision * recall / denom, 0.0)
        union = pred_pos + actual - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), 0.0)
        return {"maxF": f.max().float(), "mIoU": iou.max().float()}


class SaliencyImageF(Metric):
    """Definition B: per-image precision/recall/Jaccard averaged over images, F with β = 1.

    Per image and threshold (valid pixels only): precision = TP/(TP+FP), 0 when nothing is
    predicted; recall = TP/(TP+FN), 0 when nothing is salient; Jaccard = TP/|pred ∪ gt|, 1 when
    both are empty (as in the MTI-Net code). States are sums over images: exact under DDP.
    """

    full_state_update = False

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLDS_B, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer(
            "thresholds", torch.tensor(thresholds, dtype=torch.float64), persistent=False
        )
        k = len(thresholds)
        for name in ("precision_sum", "recall_sum", "jaccard_sum"):
            self.add_state(name, torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        probs, positive, valid = _probabilities_and_valid(preds, target)
        predicted = (probs[:, :, None] > self.thresholds.to(probs.device)) & valid[:, :, None]
        positive = (positive & valid)[:, :, None]  # [B, N, 1]
        tp = (predicted & positive).sum(1).double()  # [B, K]
        n_pred = predicted.sum(1).double()
        n_true = positive.sum(1).double()
        union = n_pred + n_true - tp
        self.precision_sum += (tp / n_pred.clamp_min(1)).sum(0)
        self.recall_sum += (tp / n_true.clamp_min(1)).sum(0)
        self.jaccard_sum += torch.where(union > 0, tp / union.clamp_min(1), 1.0).sum(0)
        self.images += probs.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.images.double()
        precision, recall = self.precision_sum / n, self.recall_sum / n
        denom = precision + recall
        f = torch.where(denom > 0, 2 * precision * recall / denom, 0.0)
        return {"maxF": f.max().float(), "mIoU": (self.jaccard_sum / n).max().float()}


def saliency_metric(definition: str = "A") -> Metric:
    """The saliency metric of ``definition``: "A" (ATRC/InvPT) or "B" (MTI-Net/MTLoRA/M3ViT)."""
    definitions = {"A": SaliencyDatasetF, "B": SaliencyImageF}
    if definition not in definitions:
        raise ValueError(f"saliency maxf definition '{definition}': expected 'A' or 'B'")
    return definitions[definition]()
