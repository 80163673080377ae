"""`modsquad` (Mod-Squad, CVPR 2023): mixture-of-experts attention on the even ViT blocks,
mixture-of-experts MLP on the odd ones, per-task zero-initialised gates, a learned task
embedding added before every block and the task-expert mutual-information loss.

Attention experts are query heads: expert e maps C -> head_dim, one key/value projection
(C -> 2 head_dim) is shared by all of them (multi-query), top-k = the number of heads, and each
selected expert's output projection (head_dim -> C) is gate-weighted and summed. Gates: softmax
of a per-task linear gate (no bias, zeros at start, so routing starts uniform) plus 1e-4, the
top k kept without renormalising. The reference runs the backbone once per task from the same
patch tokens; every operation here is per token, so the task batch (the T*B rows of all tasks
from block 0 on) computes exactly those T passes in one.

Mutual-information loss per layer over the accumulation window of one forward pass, which holds
all tasks: ``P(t, e) = sum over task t's tokens of probs[e] / number of tokens``. Under DDP the
joint table, the token count and the selection counts are all-reduced (a differentiable sum)
when `sync_statistics` is on, so 2 processes compute the loss of the global batch exactly;
with it off each process uses its own batch (one all-reduce per MoE layer and step saved).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.lora import freeze_base
from mtl.models.adapters.moe import ExpertMLPs, cv_squared
from mtl.models.adapters.routing import (
    EPS,
    KeptExperts,
    all_reduce_sum,
    grouped_linear,
    keep_usage_optional,
    mutual_information_terms,
    update_usage,
)
from mtl.models.adapters.task_batch import TaskBatch, block_names


class TaskGate(nn.Module):
    """Per-task gate of one MoE layer; after each forward, `balance_loss` holds the weighted
    auxiliary loss of each task (its term of the MI sum, whose total is the layer's MI loss;
    optional cv² and z-loss; `balance_weight` is 1) and `load` the selections per task and
    expert (T x E)."""

    balance_weight = 1.0

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        tasks: Sequence[str],
        task_batch: TaskBatch,
        kept: Sequence[int] | None = None,
        mi_weight: float = 0.005,
        cv_weight: float = 0.0,
        z_weight: float = 0.0,
        usage_momentum: float = 0.95,
        sync_statistics: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"Mod-Squad top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts, self.top_k, self.task_batch = num_experts, top_k, task_batch
        self.tasks = list(tasks)
        self.moe_gate = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(num_experts, dim)) for t in tasks}
        )
        self.selection = KeptExperts(num_experts, kept)
        self.register_buffer("expert_usage", torch.zeros(len(tasks), num_experts))
        keep_usage_optional(self)
        self.mi_weight, self.cv_weight, self.z_weight = mi_weight, cv_weight, z_weight
        self.usage_momentum, self.sync_statistics = usage_momentum, sync_statistics
        self.balance_loss: dict[str, Tensor] = {}
        self.load: Tensor | None = None
        self.load_tasks: list[str] = []

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.moe_gate[task]]

    def forward(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Local expert ids and gates (T x n x k) of tokens `rows` (T x n x C)."""
        tasks = self.task_batch.active
        weights = torch.stack([self.moe_gate[t] for t in tasks])  # T x E x C
        logits = torch.bmm(rows, weights.transpose(1, 2)).float()
        probs = logits.softmax(dim=-1) + EPS
        gates, experts = self.selection.choose(probs, self.top_k)
        self._record(tasks, logits, probs, experts)
        return self.selection.local[experts], gates.to(rows.dtype)

    def _record(self, tasks: list[str], logits: Tensor, probs: Tensor, experts: Tensor) -> None:
        t, n, e = probs.shape
        counts = torch.zeros(t, e, device=probs.device).scatter_add_(
            -1, experts.reshape(t, -1), torch.ones(t, n * self.top_k, device=probs.device)
        )
        joint, tokens = probs.sum(1), probs.new_tensor([float(t * n)])
        if self.training and self.sync_statistics:
            summed = all_reduce_sum(torch.cat([joint.reshape(-1), counts.reshape(-1), tokens]))
            joint, counts = summed[: t * e].reshape(t, e), summed[t * e : 2 * t * e].reshape(t, e)
            tokens = summed[-1:]
        elif self.training:  # the usage EMA is of the global batch either way
            counts = all_reduce_sum(counts)
        self.load, self.load_tasks = counts.detach(), list(tasks)
        if self.training:
            rows = [self.tasks.index(task) for task in tasks]
            update_usage(self.expert_usage, rows, counts.detach(), self.usage_momentum)
        mi = mutual_information_terms(joint / tokens)
        self.balance_loss = {}
        for i, task in enumerate(tasks):
            loss = self.mi_weight * mi[i]
            if self.cv_weight:
                importance = probs[i].sum(0)
                loss = loss + self.cv_weight * (cv_squared(importance) + cv_squared(counts[i]))
            if self.z_weight:
                loss = loss + self.z_weight * torch.logsumexp(logits[i], -1).pow(2).mean()
            self.balance_loss[task] = loss


class MoEAttention(nn.Module):
    """Task-routed attention: experts are query heads over one shared key/value head."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_experts: int,
        head_dim: int,
        gate: TaskGate,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.top_k, self.head_dim, self.attn_drop = num_heads, head_dim, attn_drop
        self.gate = gate
        kept = len(gate.selection.kept)
        self.moe_q = nn.Parameter(torch.empty(kept, head_dim, dim))
        self.moe_kv = nn.Linear(dim, 2 * head_dim, bias=qkv_bias)
        self.moe_o = nn.Parameter(torch.empty(kept, dim, head_dim))
        self.moe_o_bias = nn.Parameter(torch.zeros(dim))
        for w in (self.moe_q, self.moe_o):
            nn.init.trunc_normal_(w, std=0.02)

    @property
    def kept(self) -> list[int]:
        return self.gate.selection.kept

    @property
    def expert_usage(self) -> Tensor:
        return self.gate.expert_usage

    def expert_parameters(self) -> list[str]:
        return ["moe_q", "moe_o"]

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        rows, n, c = x.shape
        k = self.top_k
        experts, gates = self.gate(self.gate.task_batch.by_task(x))
        experts, gates = experts.reshape(-1, k), gates.reshape(-1, k)
        q = grouped_linear(x.reshape(-1, c), experts, self.moe_q)  # rows*n x k x hd
        q = q.reshape(rows, n, k, -1).transpose(1, 2)
        key, value = self.moe_kv(x).unsqueeze(1).expand(-1, k, -1, -1).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(
            q,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal,
        )
        out = out.transpose(1, 2).reshape(rows * n, k, -1)
        y = grouped_linear(out, experts, self.moe_o)
        return ((y * gates.unsqueeze(-1)).sum(1) + self.moe_o_bias).reshape(rows, n, c)


class ModSquadMlp(nn.Module):
    """Task-routed mixture of MLP experts (`ExpertMLPs`) under a `TaskGate`."""

    def __init__(self, dim: int, hidden: int, gate: TaskGate, act: nn.Module) -> None:
        super().__init__()
        self.top_k, self.gate = gate.top_k, gate
        self.experts = ExpertMLPs(len(gate.selection.kept), dim, hidden, act)

    @property
    def kept(self) -> list[int]:
        return self.gate.selection.kept

    @property
    def expert_usage(self) -> Tensor:
        return self.gate.expert_usage

    def expert_parameters(self) -> list[str]:
        return ["experts.moe_w1", "experts.moe_b1", "experts.moe_w2", "experts.moe_b2"]

    def forward(self, x: Tensor) -> Tensor:
        experts, gates = self.gate(self.gate.task_batch.by_task(x))
        flat = x.reshape(-1, x.shape[-1])
        out = self.experts(flat, experts.reshape(-1, self.top_k), gates.reshape(-1, self.top_k))
        return out.reshape(x.shape)


class TaskEmbedding(nn.Module):
    """A learned embedding per task (the reference's 1 x T x C table)."""

    def __init__(self, dim: int, tasks: Sequence[str], task_batch: TaskBatch) -> None:
        super().__init__()
        self.task_batch = task_batch
        self.moe_task_embed = nn.ParameterDict(
            {t: nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.02)) for t in tasks}
        )

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.moe_task_embed[task]]

    def forward(self, x: Tensor) -> Tensor:
        """`x` (T*B x n x C) plus each row's task embedding."""
        batch = self.task_batch
        table = torch.stack([self.moe_task_embed[t] for t in batch.active])  # T x C
        return x + table.repeat_interleave(batch.batch_size, dim=0)[:, None, :].to(x.dtype)


class AddTaskEmbedding:
    """Forward pre-hook adding the task embedding to a block's input (an object, not a closure,
    so that `copy.deepcopy` rebinds it)."""

    def __init__(self, embedding: TaskEmbedding) -> None:
        self.embedding = embedding

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.embedding(args[0]), *args[1:])


class ModSquad(Adapter):
    """Mod-Squad's "twice" ViT: MoE attention on even blocks, MoE MLP on odd blocks.

    Args:
        attn_experts: attention experts (query heads); None: 2 x the block's heads (24 for 12).
        head_dim: expert head size; None: 2 x dim / heads (128 for ViT-B, as the reference).
        mlp_experts: MLP experts (16).
        mlp_top_k: MLP experts per token (4).
        mlp_hidden: expert hidden size; None: the MLP's hidden size / mlp_top_k.
        task_embedding: add a learned task embedding before every block.
        mi_weight: weight of the mutual-information loss (0.005).
        cv_weight, z_weight: weights of the optional cv² (importance + load) and z-loss terms.
        sync_statistics: all-reduce the MI statistics over DDP processes (exact global loss).
        usage_momentum: EMA momentum of the expert usage that `mtl.extract` prunes by.
        kept_experts: {block index: kept expert ids} (written by `mtl.extract`); None: all.
        init_from_mlp: MLP experts start from chunks of the block's (pretrained) MLP; the
            attention experts start at random (their head size differs from the dense heads).
        freeze_backbone, trainable: as `moe`.
    """

    task_aware = True

    def __init__(
        self,
        attn_experts: int | None = None,
        head_dim: int | None = None,
        mlp_experts: int = 16,
        mlp_top_k: int = 4,
        mlp_hidden: int | None = None,
        task_embedding: bool = True,
        mi_weight: float = 0.005,
        cv_weight: float = 0.0,
        z_weight: float = 0.0,
        sync_statistics: bool = True,
        usage_momentum: float = 0.95,
        kept_experts: dict[int, Sequence[int]] | None = None,
        init_from_mlp: bool = True,
        freeze_backbone: bool = False,
        trainable: Sequence[str] = (),
        task_aware: bool = True,
    ) -> None:
        super().__init__(task_aware)
        self.attn_experts, self.head_dim = attn_experts, head_dim
        self.mlp_experts, self.mlp_top_k, self.mlp_hidden = mlp_experts, mlp_top_k, mlp_hidden
        self.task_embedding = task_embedding
        self.weights = dict(mi_weight=mi_weight, cv_weight=cv_weight, z_weight=z_weight)
        self.sync_statistics, self.usage_momentum = sync_statistics, usage_momentum
        self.kept_experts = {int(b): list(e) for b, e in (kept_experts or {}).items()}
        self.init_from_mlp, self.freeze_backbone = init_from_mlp, freeze_backbone
        self.trainable = list(trainable)

    def _attn_experts(self, block: nn.Module) -> int:
        return self.attn_experts or 2 * block.attn.num_heads

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        vit = getattr(model, "model", model)
        names = block_names(model)
        if not (hasattr(vit, "blocks") and hasattr(vit, "patch_embed")) or not names:
            return [
                "model.adapter: modsquad needs a plain ViT backbone (blocks with attn and mlp, "
                "e.g. vit_small_patch16_224); this backbone has none"
            ]
        problems = []
        heads = model.get_submodule(names[0]).attn.num_heads
        if self.attn_experts is not None and self.attn_experts < heads:
            problems.append(
                f"model.adapter.attn_experts: {self.attn_experts}; expected at least the number "
                f"of heads ({heads}, the attention top-k) or null"
            )
        if not 0 < self.mlp_top_k <= max(self.mlp_experts, 1):
            problems.append(
                f"model.adapter.mlp_top_k: {self.mlp_top_k}; expected 1..mlp_experts "
                f"({self.mlp_experts})"
            )
        for key in ("head_dim", "mlp_hidden"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                problems.append(f"model.adapter.{key}: {value}; expected > 0 or null")
        for index, kept in self.kept_experts.items():
            if not 0 <= index < len(names):
                problems.append(
                    f"model.adapter.kept_experts: block {index}; this ViT has blocks 0.."
                    f"{len(names) - 1}"
                )
                continue
            block = model.get_submodule(names[index])
            k, e = (
                (heads, self._attn_experts(block))
                if index % 2 == 0
                else (self.mlp_top_k, self.mlp_experts)
            )
            if len(set(kept)) < k or not all(0 <= i < e for i in kept):
                problems.append(
                    f"model.adapter.kept_experts: block {index}: {list(kept)}; expected at least "
                    f"{k} distinct ids in 0..{e - 1}"
                )
        return problems

    def _gate(self, dim: int, experts: int, k: int, tasks, batch, index: int) -> TaskGate:
        return TaskGate(
            dim,
            experts,
            k,
            tasks,
            batch,
            self.kept_experts.get(index),
            usage_momentum=self.usage_momentum,
            sync_statistics=self.sync_statistics,
            **self.weights,
        )

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> TaskBatch:
        self._check(model, taps)
        batch = TaskBatch(tasks)
        names = block_names(model)
        for index, name in enumerate(names):
            block = model.get_submodule(name)
            attn, mlp = block.attn, block.mlp
            dim = mlp.fc1.in_features
            if index % 2 == 0:
                heads = attn.num_heads
                gate = self._gate(dim, self._attn_experts(block), heads, tasks, batch, index)
                head_dim = self.head_dim or 2 * dim // heads
                block.attn = MoEAttention(
                    dim,
                    heads,
                    self._attn_experts(block),
                    head_dim,
                    gate,
                    qkv_bias=attn.qkv.bias is not None,
                    attn_drop=attn.attn_drop.p,
                )
            else:
                gate = self._gate(dim, self.mlp_experts, self.mlp_top_k, tasks, batch, index)
                hidden = self.mlp_hidden or max(mlp.fc1.out_features // self.mlp_top_k, 1)
                layer = ModSquadMlp(dim, hidden, gate, mlp.act)
                if self.init_from_mlp:  # (an extracted model's weights come from its checkpoint)
                    layer.experts.init_from(mlp.fc1, mlp.fc2)
                block.mlp = layer
        if self.freeze_backbone:
            freeze_base(model, self.trainable)
        batch.attach(model.get_submodule(names[0]))
        if self.task_embedding:
            vit = getattr(model, "model", model)
            vit.moe_task_embedding = TaskEmbedding(dim, tasks, batch)
            for name in names:
                model.get_submodule(name).register_forward_pre_hook(
                    AddTaskEmbedding(vit.moe_task_embedding)
                )
        return batch
