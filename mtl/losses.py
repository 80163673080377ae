"""Per-task losses. Each takes the raw prediction and the target of the sample contract and
ignores invalid pixels (ignore label 255, depth 0, zero normal vectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over `mask`; zero (still differentiable) when nothing is valid."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp_min(1)


def cross_entropy(pred: Tensor, target: Tensor) -> Tensor:
    """Pixel-wise cross-entropy over valid pixels, ignore label 255 (semseg, parts)."""
    if (target != IGNORE_INDEX).any():
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
    return pred.sum() * 0.0  # an all-ignore batch (e.g. no person for parts) contributes nothing


def _binary_cross_entropy(pred: Tensor, target: Tensor, pos_weight: Tensor | float) -> Tensor:
    """BCE with positives weighted by `pos_weight` and negatives by 1 - pos_weight."""
    valid = target != IGNORE_INDEX
    label = torch.where(valid, target, torch.zeros_like(target))
    loss_pos = F.softplus(-pred)  # -log(sigmoid(x))
    loss_neg = F.softplus(pred)  # -log(1 - sigmoid(x))
    loss = pos_weight * label * loss_pos + (1 - pos_weight) * (1 - label) * loss_neg
    return _masked_mean(loss, valid)


def balanced_bce(pred: Tensor, target: Tensor) -> Tensor:
    """Class-balanced BCE (saliency): positives weighted by the share of negatives in the batch."""
    valid = target != IGNORE_INDEX
    positives = ((target == 1) & valid).sum()
    pos_weight = 1 - positives / valid.sum().clamp_min(1)
    return _binary_cross_entropy(pred, target, pos_weight.detach())


def edge_bce(pred: Tensor, target: Tensor, pos_weight: float = 0.95) -> Tensor:
    """Edge BCE with fixed weights: positives x 0.95, negatives x 0.05."""
    return _binary_cross_entropy(pred, target, pos_weight)


def depth_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over pixels with valid (non-zero) depth."""
    valid = target > 0
    return _masked_mean((pred - target).abs(), valid)


def normals_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 between the L2-normalised prediction and the target on valid (non-zero) pixels."""
    valid = (target.abs().sum(dim=1, keepdim=True) > 0).expand_as(target)
    pred = F.normalize(pred, dim=1)
    return _masked_mean((pred - target).abs(), valid)


def multilabel_edge_bce(pred: Tensor, target: Tensor) -> Tensor:
    """SBCB's semantic-boundary loss (DFF's class-balanced multi-label BCE) on the fused and
    the last side output, summed: `pred` is [B, 2K, H, W] (fused logits, then last), `target`
    the K-channel {0, 1} map. Per image, positives are weighted by
    clamp(negatives / positives, 1, pixels x K); the BCE is averaged over pixels and classes,
    then over the batch."""
    pred = pred.float()  # sums over K x H x W pixels: not in half precision
    target = target.float()
    dims = tuple(range(1, target.ndim))
    total = target[0].numel()
    positives = target.sum(dims)
    pos_weight = ((total - positives) / positives).clamp(1, total)  # no positive: total
    pos_weight = pos_weight.view(-1, *([1] * (target.ndim - 1)))

    def balanced(logits: Tensor) -> Tensor:
        loss = pos_weight * target * F.softplus(-logits) + (1 - target) * F.softplus(logits)
        return loss.mean()

    fused, last = pred.chunk(2, dim=1)
    return balanced(fused) + balanced(last)
