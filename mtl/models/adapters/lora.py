"""Low-rank adapters for linear layers: shared (`LoRALinear`) and per task (`TaskLoRALinear`).

peft can inject a shared LoRA into a timm model, but it cannot train a different adapter per
task within one forward pass; the per-task layer below does that with the task batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl.models.adapters.task_batch import TaskBatch


def _pair(in_features: int, out_features: int, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A (rank x in, Kaiming-uniform) and B (out x rank, zeros): the pair starts as a no-op."""
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(out_features, rank))


class WrappedLinear(nn.Module):
    """A layer that adds to a wrapped linear ``self.base`` and keeps its shape attributes, so
    code that reads ``in_features``/``out_features`` (timm, other adapters) sees a linear."""

    base: nn.Module

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class LoRALinear(WrappedLinear):
    """``base(x) + scale * B A dropout(x)`` with scale = alpha / rank; `base` stays as given.

    `merge` folds ``scale * B A`` into the base weight (inference without the extra matmuls);
    `unmerge` takes it out again.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_A, self.lora_B = _pair(base.in_features, base.out_features, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> Tensor:
        return self.scale * self.lora_B @ self.lora_A

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scale * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class TaskLoRALinear(WrappedLinear):
    """``base(x)`` plus, for each row of the task batch, the LoRA pair of that row's task.

    Only the requested tasks' pairs are stacked and used, so a task that is not computed gets
    no gradient. `base` is usually a `LoRALinear` (the task-agnostic part).
    """

    def __init__(
        self,
        base: nn.Module,
        tasks: Sequence[str],
        task_batch: TaskBatch,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"task LoRA rank must be positive, got {rank}")
        self.base, self.task_batch = base, task_batch
        self.rank, self.scale = rank, alpha / rank
        pairs = {t: _pair(base.in_features, base.out_features, rank) for t in tasks}
        self.lora_A = nn.ParameterDict({t: a for t, (a, _) in pairs.items()})
        self.lora_B = nn.ParameterDict({t: b for t, (_, b) in pairs.items()})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.lora_A[task], self.lora_B[task]]

    def forward(self, x: Tensor) -> Tensor:
        active = self.task_batch.active
        a = torch.stack([self.lora_A[t] for t in active])  # T x r x in
        b = torch.stack([self.lora_B[t] for t in active])  # T x out x r
        rows = self.task_batch.by_task(self.dropout(x))  # T x n x in
        delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))
        return self.base(x) + self.scale * delta.reshape(*x.shape[:-1], -1)


def matching_linears(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the `nn.Linear` modules whose name ends with one of the regex `patterns`."""
    compiled = [re.compile(rf"(^|\.){p}$") for p in patterns]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(c.search(name) for c in compiled)
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def freeze_base(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Freeze every parameter except adapters (``lora_`` / ``moe_`` in the name) and those whose
    name matches one of the regex `trainable`; returns the names of the base ones kept."""
    keep = [re.compile(p) for p in trainable]
    kept = []
    for name, param in model.named_parameters():
        adapter = "lora_" in name or "moe_" in name
        base_kept = not adapter and any(k.search(name) for k in keep)
        param.requires_grad_(adapter or base_kept)
        if base_kept:
            kept.append(name)
    return kept


#: The linear layers of a timm ViT / Swin block that LoRA adapts by default.
DEFAULT_TARGETS = (r"attn\.qkv", r"attn\.proj", r"mlp\.fc1", r"mlp\.fc2")
