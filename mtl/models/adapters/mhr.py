"""`mhr` (Multi-Head Routing, Caccia et al., NeurIPS 2023): an inventory of S LoRA skills per
linear layer, each split into h heads along the input (A) and output (B) dimensions, combined
per task and head with routing weights ``sigmoid(Z) / sum_s sigmoid(Z)``; h = 1 is Poly.

Per task t: ``A_t = concat_q sum_s w[t, q, s] A[q, s]`` (along d_in) and likewise B_t along
d_out; the layer adds ``scale * x A_t B_t`` (scale = alpha / rank) to the frozen base. The
rows of the task batch are multiplied by their own task's composed pair (one batched product).
The reference's extra "unknown task" routing row (a uniform average at evaluation) is not
needed here: every evaluated task has its own row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.lora import (
    DEFAULT_TARGETS,
    WrappedLinear,
    freeze_base,
    matching_linears,
    replace_module,
)
from mtl.models.adapters.task_batch import TaskBatch, first_task_block


class MHRLinear(WrappedLinear):
    """``base(x) + scale * x A_t B_t`` with (A_t, B_t) routed from S skills in h heads."""

    def __init__(
        self,
        base: nn.Linear,
        tasks: Sequence[str],
        task_batch: TaskBatch,
        skills: int,
        heads: int,
        rank: int,
        alpha: float,
    ) -> None:
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        if d_in % heads or d_out % heads:
            raise ValueError(f"MHR heads {heads} must divide {d_in} and {d_out}")
        self.base, self.task_batch = base, task_batch
        self.heads, self.rank, self.scale = heads, rank, alpha / rank
        bound = 1 / math.sqrt(d_in)  # Kaiming-uniform (a = sqrt 5) on d_in
        self.lora_A = nn.Parameter(
            torch.empty(heads, skills, d_in // heads, rank).uniform_(-bound, bound)
        )
        self.lora_B = nn.Parameter(torch.zeros(heads, skills, rank, d_out // heads))
        self.lora_logits = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(heads, skills).uniform_(-1e-3, 1e-3)) for t in tasks}
        )

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.lora_logits[task]]

    def routing(self, tasks: Sequence[str]) -> Tensor:
        """Weights (T x h x S): sigmoid of the logits, normalised over skills per head."""
        z = torch.stack([self.lora_logits[t] for t in tasks]).sigmoid()
        return z / z.sum(-1, keepdim=True)

    def composed(self, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Per task, A_t (T x d_in x r) and B_t (T x r x d_out)."""
        w = self.routing(tasks)
        t = w.shape[0]
        a = torch.einsum("tqs,qsir->tqir", w, self.lora_A).reshape(t, -1, self.rank)
        b = torch.einsum("tqs,qsro->trqo", w, self.lora_B).reshape(t, self.rank, -1)
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.composed(self.task_batch.active)
        rows = self.task_batch.by_task(x)  # T x n x d_in
        delta = torch.bmm(torch.bmm(rows, a.to(x.dtype)), b.to(x.dtype))
        return self.base(x) + self.scale * delta.reshape(*x.shape[:-1], -1)


class MHR(Adapter):
    """Multi-Head Routing of LoRA skills on every linear matching `targets`; base frozen.

    Args:
        skills: S, LoRA skills per layer.
        heads: h, the pieces of d_in and d_out routed separately (1: Poly).
        rank, alpha: LoRA rank and scale numerator (scale = alpha / rank).
        targets: regexes matched against the end of module names.
        freeze_backbone: freeze the base weights except `trainable` (false: train them too).
        trainable: regexes of base parameter names that stay trainable.
    """

    task_aware = True

    def __init__(
        self,
        skills: int = 8,
        heads: int = 4,
        rank: int = 4,
        alpha: float = 8.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        freeze_backbone: bool = True,
        trainable: Sequence[str] = (),
        task_aware: bool = True,
    ) -> None:
        super().__init__(task_aware)
        self.freeze_backbone = freeze_backbone
        self.skills, self.heads, self.rank, self.alpha = skills, heads, rank, alpha
        self.targets, self.trainable = list(targets), list(trainable)

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        problems = [
            f"model.adapter.{key}: {getattr(self, key)}; expected a positive integer"
            for key in ("skills", "heads", "rank")
            if getattr(self, key) <= 0
        ]
        names = matching_linears(model, self.targets)
        if not names:
            problems.append(
                f"model.adapter.targets: [{', '.join(self.targets)}] match no linear layer of "
                "this backbone; expected name suffixes such as attn.qkv, mlp.fc1 (ViT/Swin)"
            )
        elif self.heads > 0:
            odd = [
                n
                for n in names
                if model.get_submodule(n).in_features % self.heads
                or model.get_submodule(n).out_features % self.heads
            ]
            if odd:
                problems.append(
                    f"model.adapter.heads: {self.heads} does not divide the input and output "
                    f"sizes of {odd[0]}; expected a common divisor of the layer widths"
                )
        return problems

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> TaskBatch:
        self._check(model, taps)
        batch = TaskBatch(tasks)
        names = matching_linears(model, self.targets)
        for name in names:
            layer = MHRLinear(
                model.get_submodule(name),
                tasks,
                batch,
                self.skills,
                self.heads,
                self.rank,
                self.alpha,
            )
            replace_module(model, name, layer)
        if self.freeze_backbone:
            freeze_base(model, self.trainable)
        batch.attach(first_task_block(model, names))
        return batch
