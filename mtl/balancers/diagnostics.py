"""Gradient-conflict statistics from the Gramian of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def conflict_statistics(gram: Tensor, tasks: Sequence[str]) -> dict[str, float]:
    """Per task its gradient norm, per task pair the cosine similarity of their gradients on the
    shared parameters, and the share of pairs that conflict (negative inner product)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    stats = {f"grad/{task}/norm": float(n) for task, n in zip(tasks, norms, strict=True)}
    pairs = torch.triu_indices(len(tasks), len(tasks), offset=1).T.tolist()
    conflicts = 0
    for i, j in pairs:
        cosine = gram[i, j] / (norms[i] * norms[j]).clamp_min(1e-20)
        stats[f"grad/cos/{tasks[i]}-{tasks[j]}"] = float(cosine)
        conflicts += int(gram[i, j] < 0)
    if pairs:
        stats["grad/conflict_share"] = conflicts / len(pairs)
    return stats
