"""TaskExpert's decoder (Ye & Xu, ICCV 2023, arXiv 2307.15324), reconstructed.

**The authors' code was never released.** This is a reconstruction from the paper's
description (its abstract and the caption of its Fig. 2), not the published model: expert
networks decompose the backbone feature into task-generic features; per-task, sample-dependent
gates assemble each task's feature from them; a per-task feature memory is read as one more
expert and written at every layer; the last layer's memory feeds the prediction heads.
Everything the description leaves open is an option (``conf/model/decoder/taskexpert.yaml``),
with defaults borrowed from MLoRE, a released decoder of the same family.

Per backbone level l (one "memorial mixture-of-experts" layer each), task t:

- ``X' = Conv1x1(C_l -> D)(X_l)``; experts ``E_k(X') = GELU(norm(Conv1x1_k(X')))``, k = 1..K;
- gates ``g_t = softmax_{K+1}(Conv1x1_t([X'; M_t^{l-1}]))``, per pixel or per image (pooled);
- read ``F_t = sum_k g_{t,k} E_k(X') + g_{t,K+1} M_t^{l-1}``;
- write ``M_t^l = F_t`` (replace) or ``M_t^{l-1} + F_t`` (accumulate);
- ``M_t^0``: a learned per-task vector (zeros at the start, constant over the map) or a per-task
  expert on the first level, ``E_t(X'_0)``.

Heads: ``M_t^L`` upsampled x4, then 3x3 conv-norm-GELU and a 1x1 conv (MLoRE's ``ConvHead``).

Levels of different sizes (ResNet, Swin): every projected level is resized (bilinearly) to the
finest level's size, so the memory lives at the finest stride. ViT taps all share one size.

The experts and projections are shared by all tasks; the gates, the initial memory and the
heads are each task's own, and only the requested tasks' parts run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from mtl.models.decoders.base import MultiTaskDecoder, TaskInputs
from mtl.models.decoders.layers import normalisation

GATES = ("pixel", "image")
MEMORY_UPDATES = ("replace", "accumulate")
MEMORY_INITS = ("zeros", "expert")


def _expert_norm(kind: str, experts: int, channels: int) -> nn.Module:
    """Normalisation of `experts` stacked outputs of `channels` each; group norm's groups never
    span two experts, so it equals a separate norm per expert."""
    if kind == "group":
        return nn.GroupNorm(experts * math.gcd(32, channels), experts * channels)
    return normalisation(kind, experts * channels)


class Experts(nn.Module):
    """K experts ``GELU(norm(Conv1x1_k(x)))``, run as one convolution with K*D outputs (the same
    function as K separate ones, in one kernel); output (B, K, D, h, w)."""

    def __init__(self, channels: int, num_experts: int, norm: str = "batch") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.conv = nn.Conv2d(channels, num_experts * channels, 1, bias=norm == "none")
        self.norm = _expert_norm(norm, num_experts, channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.conv(x))).unflatten(1, (self.num_experts, -1))


class ZeroMemory(nn.Module):
    """``M_t^0`` as a learned per-task vector, zeros at the start, constant over the map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # a new tensor, not a view of the parameter (a view made under no_grad would claim
        # requires_grad without a grad_fn, which module hooks reject)
        return torch.zeros_like(x) + self.bias


class ExpertMemory(Experts):
    """``M_t^0 = E_t(X'_0)``: one task-specific expert on the first level."""

    def __init__(self, channels: int, norm: str = "batch") -> None:
        super().__init__(channels, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, 0]


class MemorialMoE(nn.Module):
    """One level: the projection, K shared experts and a gate per task over K experts + memory."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_experts: int,
        tasks: Sequence[str],
        gate: str = "pixel",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, channels, 1)
        self.experts = Experts(channels, num_experts, norm)
        self.gates = nn.ModuleDict({t: nn.Conv2d(2 * channels, num_experts + 1, 1) for t in tasks})
        self.per_image = gate == "image"

    def gate(self, task: str, x: Tensor, memory: Tensor) -> Tensor:
        """Task `task`'s gate probabilities over the K experts and the memory (the last
        channel): (B, K+1, h, w) per pixel, (B, K+1, 1, 1) per image."""
        z = torch.cat([x, memory], dim=1)
        if self.per_image:
            z = z.mean(dim=(2, 3), keepdim=True)
        return self.gates[task](z).softmax(dim=1)

    @staticmethod
    def read(gates: Tensor, experts: Tensor, memory: Tensor) -> Tensor:
        """``sum_k g_k E_k + g_{K+1} M``: the experts and the memory mixed by the gates."""
        k = experts.shape[1]
        return (gates[:, :k, None] * experts).sum(dim=1) + gates[:, k:] * memory


class ConvHead(nn.Module):
    """Upsample, 3x3 conv-norm-GELU, 1x1 conv to the task's channels."""

    def __init__(self, channels: int, out_channels: int, upsample: int, norm: str) -> None:
        super().__init__()
        self.upsample = upsample
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"),
            normalisation(norm, channels),
            nn.GELU(),
        )
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.classifier(self.block(x))


class TaskExpertDecoder(MultiTaskDecoder):
    """Memorial mixture-of-experts decoder (reconstruction; see the module docstring).

    Args:
        in_channels, in_strides: the backbone levels, one MMoE layer each, in list order (the
            memory flows from the first level to the last).
        task_channels: output channels per task.
        hidden_channels: D, the width of the projections, experts, memory and heads.
        num_experts: K shared experts per level.
        gate: ``pixel`` (one gate per position) or ``image`` (one per image, from pooled inputs).
        memory_update: ``replace`` (``M^l = F^l``) or ``accumulate`` (``M^l = M^{l-1} + F^l``).
        memory_init: ``zeros`` (learned per-task vector, zero at the start) or ``expert``
            (``E_t(X'_0)``).
        balance_weight: weight of the gate load-balancing term, cv² of the mean gate
            probability of each expert (over images, positions and tasks), summed over levels
            and split equally among the tasks; 0: off.
        head_upsample: factor of the heads' bilinear upsampling before their convs.
        norm: ``batch``, ``group`` or ``none`` in the experts and heads.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        task_channels: Mapping[str, int],
        hidden_channels: int = 192,
        num_experts: int = 9,
        gate: str = "pixel",
        memory_update: str = "replace",
        memory_init: str = "zeros",
        balance_weight: float = 0.0,
        head_upsample: int = 4,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        problems = self.option_problems(
            dict(
                hidden_channels=hidden_channels,
                num_experts=num_experts,
                gate=gate,
                memory_update=memory_update,
                memory_init=memory_init,
                balance_weight=balance_weight,
                head_upsample=head_upsample,
            )
        )
        if problems:
            raise ValueError("; ".join(problems))
        tasks = list(task_channels)
        d = hidden_channels
        self.finest = min(range(len(in_strides)), key=lambda i: in_strides[i])
        self.accumulate = memory_update == "accumulate"
        self.balance_weight = float(balance_weight)
        self.levels = nn.ModuleList(
            MemorialMoE(c, d, num_experts, tasks, gate, norm) for c in in_channels
        )
        self.memory_init = nn.ModuleDict(
            {t: ZeroMemory(d) if memory_init == "zeros" else ExpertMemory(d, norm) for t in tasks}
        )
        self.heads = nn.ModuleDict(
            {t: ConvHead(d, c, head_upsample, norm) for t, c in task_channels.items()}
        )
        #: per task, each level's gate probabilities in the last forward (detached)
        self.last_gates: dict[str, list[Tensor]] = {}
        self._auxiliary: dict[str, Tensor] = {}

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """The decoder node's problems, found before training (``mtl.config``)."""
        return cls.option_problems(OmegaConf.to_container(cfg.model.decoder, resolve=True))

    @staticmethod
    def option_problems(options: dict[str, Any]) -> list[str]:
        """Problems of the ``model.decoder`` options, one line each naming the key."""

        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        checks = [
            ("num_experts", integer, "an integer >= 1"),
            ("head_upsample", integer, "an integer >= 1"),
            ("gate", lambda v: v in GATES, f"one of {list(GATES)}"),
            ("memory_update", lambda v: v in MEMORY_UPDATES, f"one of {list(MEMORY_UPDATES)}"),
            ("memory_init", lambda v: v in MEMORY_INITS, f"one of {list(MEMORY_INITS)}"),
            (
                "balance_weight",
                lambda v: (
                    isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                    and v >= 0
                ),
                "a number >= 0 (0: off)",
            ),
        ]
        return [
            f"model.decoder.{key}: {options[key]!r}; expected {allowed}"
            for key, test, allowed in checks
            if key in options and not test(options[key])
        ]

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        modules = [level.gates[task] for level in self.levels]
        modules += [self.memory_init[task], self.heads[task]]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def project(self, level: int, features: Sequence[Tensor]) -> Tensor:
        """``X'`` of `level`, at the finest level's size."""
        x = self.levels[level].project(features[level])
        size = features[self.finest].shape[-2:]
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def memories(self, inputs: TaskInputs) -> dict[str, list[Tensor]]:
        """Each requested task's memory ``[M^0, ..., M^L]``; records the gates (`last_gates`)
        and the load-balancing losses (`auxiliary_losses`)."""
        tasks = list(inputs)
        memory: dict[str, list[Tensor]] = {t: [] for t in tasks}
        self.last_gates = {t: [] for t in tasks}
        balance: list[Tensor] = []
        for index, level in enumerate(self.levels):
            # the shared part runs once per distinct feature list (once with a shared backbone,
            # per task with a task-aware one)
            shared: dict[int, tuple[Tensor, Tensor]] = {}
            usage = []
            for task in tasks:
                key = id(inputs[task][index])
                if key not in shared:
                    x = self.project(index, inputs[task])
                    shared[key] = (x, level.experts(x))
                x, experts = shared[key]
                if index == 0:
                    memory[task].append(self.memory_init[task](x))
                previous = memory[task][-1]
                gates = level.gate(task, x, previous)
                read = level.read(gates, experts, previous)
                memory[task].append(previous + read if self.accumulate else read)
                self.last_gates[task].append(gates.detach())
                usage.append(gates[:, :-1].mean(dim=(0, 2, 3)))
            if self.balance_weight > 0:
                balance.append(_cv_squared(torch.stack(usage).mean(dim=0)))
        self._auxiliary = {}
        if balance:
            share = self.balance_weight * torch.stack(balance).sum() / len(tasks)
            self._auxiliary = dict.fromkeys(tasks, share)
        return memory

    def forward(self, inputs: TaskInputs) -> dict[str, Tensor]:
        memory = self.memories(inputs)
        return {task: self.heads[task](memory[task][-1]) for task in inputs}

    def auxiliary_losses(self) -> dict[str, Tensor]:
        return dict(self._auxiliary)


def _cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation (unbiased variance over mean², the load-balancing
    term of sparse mixture-of-experts layers); 0 for a single expert."""
    if x.numel() < 2:
        return x.sum() * 0.0
    return x.var() / (x.mean().pow(2) + 1e-10)
