"""`lora`: one task-agnostic LoRA pair on chosen linear layers, the base weights frozen."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    freeze_base,
    matching_linears,
    replace_module,
)


class LoRA(Adapter):
    """Shared LoRA on every linear whose name ends with one of `targets`.

    Args:
        rank: r of every pair.
        alpha: the update is scaled by alpha / r.
        dropout: dropout on the LoRA input.
        targets: regexes matched against the end of module names (``attn\\.qkv`` ...).
        trainable: regexes of base parameter names that stay trainable (e.g. ``norm``); all
            other base parameters are frozen.
    """

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        trainable: Sequence[str] = (),
        task_aware: bool = False,
    ) -> None:
        super().__init__(task_aware)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets, self.trainable = list(targets), list(trainable)
        self.kept_base: list[str] = []

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        problems = []
        if self.rank <= 0:
            problems.append(f"model.adapter.rank: {self.rank}; expected a positive integer")
        if not matching_linears(model, self.targets):
            problems.append(
                f"model.adapter.targets: [{', '.join(self.targets)}] match no linear layer of "
                "this backbone;"
                " expected name suffixes such as attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (ViT/Swin)"
            )
        return problems

    def inject(self, model: nn.Module) -> list[str]:
        """Wrap the target linears in `LoRALinear`; returns their names."""
        names = matching_linears(model, self.targets)
        for name in names:
            base = model.get_submodule(name)
            replace_module(model, name, LoRALinear(base, self.rank, self.alpha, self.dropout))
        return names

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> None:
        self._check(model, taps)
        self.inject(model)
        self.kept_base = freeze_base(model, self.trainable)
        return None

    def inject_names(self, model: nn.Module) -> list[str]:
        """Names of the linears `inject` would wrap."""
        return matching_linears(model, self.targets)
