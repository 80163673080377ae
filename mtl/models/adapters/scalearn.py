"""`scalearn` (ScaLearn, ACL Findings 2024): transfer to a task by learning only the scaling of
frozen source-task adapters.

Stage 1 trains per-task adapters (``model/adapter=mtlora``: per-task LoRA on the task blocks).
Stage 2 (this adapter) rebuilds that backbone from the stage-1 checkpoint (`source_ckpt`),
freezes all of it, and in every per-task LoRA layer replaces the task's own pair by
``sum_i omega[t, i] * delta_i(x)`` over the N source tasks' pairs ``delta_i``. Only omega trains:
a vector (N x d_out) or a scalar (N) per layer and target task, optionally shared across layers
(ScaLearn++; here across the layers of one output width, as LoRA layers differ in width),
initialised from N(s / N, 0.001) and with dropout applied to omega itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.lora import TaskLoRALinear, WrappedLinear
from mtl.models.adapters.task_batch import TaskBatch

#: Where the timm model's weights sit in a checkpoint's ``state_dict``.
BACKBONE_PREFIX = "model.backbone.model."


class ScaLearnOmega(nn.Module):
    """The scaling omega of each target task over N sources: N x width (vector) or N."""

    def __init__(
        self, tasks: Sequence[str], sources: int, width: int | None, init: float, dropout: float
    ) -> None:
        super().__init__()
        shape = (sources,) if width is None else (sources, width)
        self.scalearn_omega = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(shape) * 1e-3 + init / sources) for t in tasks}
        )
        self.dropout = dropout

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.scalearn_omega[task]]

    def forward(self, tasks: Sequence[str]) -> Tensor:
        """T x N x width (or T x N x 1), dropout applied to omega while training."""
        omega = torch.stack([self.scalearn_omega[t] for t in tasks])
        omega = omega if omega.dim() == 3 else omega.unsqueeze(-1)
        return F.dropout(omega, self.dropout, self.training)


class ScaLearnLinear(WrappedLinear):
    """``base(x) + sum_i omega[t, i] * scale * B_i A_i x``, the source pairs frozen."""

    def __init__(
        self,
        source: TaskLoRALinear,
        sources: Sequence[str],
        omega: ScaLearnOmega,
        task_batch: TaskBatch,
    ) -> None:
        super().__init__()
        self.base, self.scale, self.task_batch, self.omega = (
            source.base,
            source.scale,
            task_batch,
            omega,
        )
        self.source_A = nn.Parameter(torch.stack([source.lora_A[s] for s in sources]).detach())
        self.source_B = nn.Parameter(torch.stack([source.lora_B[s] for s in sources]).detach())
        self.dropout = source.dropout

    def forward(self, x: Tensor) -> Tensor:
        rows = self.task_batch.by_task(self.dropout(x))  # T x n x d_in
        low = torch.einsum("tnd,ird->itnr", rows, self.source_A.to(x.dtype))
        deltas = torch.einsum("itnr,ior->tnio", low, self.source_B.to(x.dtype))  # T x n x N x o
        omega = self.omega(self.task_batch.active).to(x.dtype)  # T x N x (o or 1)
        mixed = (deltas * omega.unsqueeze(1)).sum(2)
        return self.base(x) + self.scale * mixed.reshape(*x.shape[:-1], -1)


def _source(path: str) -> Mapping[str, Any]:
    from mtl.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location="cpu")


class ScaLearn(Adapter):
    """Stage 2 of ScaLearn on the per-task LoRA of a stage-1 checkpoint.

    Args:
        source_ckpt: the stage-1 checkpoint (a run of ``model/adapter=mtlora``); its backbone
            options must be this run's.
        vector: omega per output channel (ScaLearn) or one scalar per source (ScaLearnUniform).
        shared: one omega for all layers of an output width (ScaLearn++).
        init_scale: s of the initialisation N(s / N, 0.001) (2: the reference's ``2_avg``).
        omega_dropout: dropout on omega (0.3).
        trainable: regexes of backbone parameter names that train besides omega.
    """

    task_aware = True

    def __init__(
        self,
        source_ckpt: str | None = None,
        vector: bool = True,
        shared: bool = False,
        init_scale: float = 2.0,
        omega_dropout: float = 0.3,
        trainable: Sequence[str] = (),
        freeze_backbone: bool = True,
        task_aware: bool = True,
    ) -> None:
        super().__init__(task_aware)
        self.source_ckpt, self.vector, self.shared = source_ckpt, vector, shared
        self.init_scale, self.omega_dropout = init_scale, omega_dropout
        self.trainable, self.freeze_backbone = list(trainable), freeze_backbone

    def _source_problems(self) -> list[str]:
        from hydra.utils import get_class

        from mtl.checkpoint import CONFIG_KEY
        from mtl.models.adapters.mtlora import MTLoRA

        hint = "the last.ckpt of a run with model/adapter=mtlora (per-task LoRA)"
        if not self.source_ckpt:
            return [f"model.adapter.source_ckpt: missing; expected {hint}"]
        if not Path(self.source_ckpt).is_file():
            return [f"model.adapter.source_ckpt: no checkpoint file at {self.source_ckpt}"]
        stored = _source(self.source_ckpt).get(CONFIG_KEY) or {}
        target = ((stored.get("model") or {}).get("adapter") or {}).get("_target_")
        try:
            per_task = issubclass(get_class(target), MTLoRA)
        except Exception:
            per_task = False
        if not per_task:
            return [
                f"model.adapter.source_ckpt: {self.source_ckpt} has adapter {target}; "
                f"expected {hint}"
            ]
        return []

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        problems = self._source_problems()
        if not 0 <= self.omega_dropout < 1:
            problems.append(f"model.adapter.omega_dropout: {self.omega_dropout}; expected [0, 1)")
        if not self.freeze_backbone:
            problems.append("model.adapter.freeze_backbone: false; ScaLearn trains omega only")
        return problems

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> TaskBatch:
        from hydra.utils import instantiate

        from mtl.checkpoint import CONFIG_KEY

        self._check(model, taps)
        checkpoint = _source(self.source_ckpt)
        stored = checkpoint[CONFIG_KEY]
        sources = list(stored["data"]["tasks"])
        node = {k: v for k, v in stored["model"]["adapter"].items()}
        source_batch = instantiate(node, _convert_="all").apply(model, taps, sources)
        state = {
            k[len(BACKBONE_PREFIX) :]: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(BACKBONE_PREFIX)
        }
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"model.adapter.source_ckpt: its backbone does not fit model.backbone "
                f"({str(error).splitlines()[0]}); use the stage-1 run's backbone options"
            ) from None
        batch = TaskBatch(tasks)
        shared: dict[int | None, ScaLearnOmega] = {}
        for name, layer in list(model.named_modules()):
            if not isinstance(layer, TaskLoRALinear):
                continue
            width = layer.out_features if self.vector else None
            omega = shared.get(width) if self.shared else None
            if omega is None:
                omega = ScaLearnOmega(
                    tasks, len(sources), width, self.init_scale, self.omega_dropout
                )
                shared[width] = omega
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                child,
                ScaLearnLinear(layer, sources, omega, batch),
            )
        keep = [re.compile(p) for p in self.trainable]
        for name, param in model.named_parameters():
            param.requires_grad_("scalearn_omega" in name or any(k.search(name) for k in keep))
        _move_attach_hook(model, source_batch, batch)
        return batch


def _move_attach_hook(model: nn.Module, old: TaskBatch, new: TaskBatch) -> None:
    """Point the input-repeating hook the source adapter attached at the new task batch."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if getattr(hook, "task_batch", None) is old:
                hook.task_batch = new
