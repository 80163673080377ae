"""`moe` (M3ViT, NeurIPS 2022): the MLP of chosen ViT blocks becomes a task-routed mixture of
experts.

Routing follows the M3ViT reference gate: logits of a router (one per task, or one shared router
fed a learned task embedding), Gaussian noise of std ``noise_std / E`` while training, softmax
over all E experts, the top k kept and NOT renormalised. Load-balancing loss per task:
``cv²(importance) + cv²(load)``, importance = summed gates per expert, load = the smooth
probability of being in the top k (noisy training; thresholds taken from the noisy logits as in
Shazeer et al., where the reference compares logits with top-k probabilities) or the routed-token
count (no noise).
Experts are shared by all tasks and compute only the tokens routed to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.special import ndtr

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.lora import freeze_base
from mtl.models.adapters.routing import (
    KeptExperts,
    all_reduce_sum,
    keep_usage_optional,
    update_usage,
)
from mtl.models.adapters.task_batch import TaskBatch, block_names, first_task_block


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation (variance / mean², unbiased variance as torch.var)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def prob_in_top_k(clean: Tensor, noisy: Tensor, std: float, top_noisy: Tensor, k: int) -> Tensor:
    """P(expert in the top k under a fresh draw of the noise), per token and expert (Shazeer et
    al. 2017); `top_noisy` holds the k+1 largest noisy values (descending) of each token."""
    threshold_in = top_noisy[:, k : k + 1]  # the (k+1)-th value: what an expert must beat
    threshold_out = top_noisy[:, k - 1 : k]  # the k-th value
    is_in = noisy > threshold_in
    return torch.where(
        is_in, ndtr((clean - threshold_in) / std), ndtr((clean - threshold_out) / std)
    )


class ExpertMLPs(nn.Module):
    """E two-layer MLPs stored as stacked weights; `forward` runs each on its own tokens only."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.moe_w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.moe_b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.moe_w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.moe_b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = act
        for w in (self.moe_w1, self.moe_w2):
            nn.init.trunc_normal_(w, std=0.02)

    @torch.no_grad()
    def init_from(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        """Expert e takes hidden-unit chunk ``e mod (mlp_hidden // hidden)`` of the pretrained
        MLP (a full copy when the sizes agree)."""
        hidden = self.moe_w1.shape[1]
        chunks = max(fc1.out_features // hidden, 1)
        for e in range(self.moe_w1.shape[0]):
            units = slice((e % chunks) * hidden, (e % chunks + 1) * hidden)
            self.moe_w1[e].copy_(fc1.weight[units])
            self.moe_b1[e].copy_(fc1.bias[units] if fc1.bias is not None else 0)
            self.moe_w2[e].copy_(fc2.weight[:, units])
            self.moe_b2[e].copy_(fc2.bias if fc2.bias is not None else 0)

    def forward(self, x: Tensor, experts: Tensor, gates: Tensor) -> Tensor:
        """``sum_j gates[n, j] * expert[experts[n, j]](x[n])`` for tokens x (N x C), experts and
        gates (N x k): tokens are grouped per expert, run, and scatter-added back."""
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.moe_w1.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            idx = token[start : start + count]
            h = self.act(F.linear(x[idx], self.moe_w1[e], self.moe_b1[e]))
            y = F.linear(h, self.moe_w2[e], self.moe_b2[e])
            g = gates.reshape(-1)[order[start : start + count]]
            out.index_add_(0, idx, y * g.unsqueeze(1).to(y.dtype))
            start += count
        return out


class TaskRouter(nn.Module):
    """Router logits per task: a linear router per task, or one shared router that also sees a
    learned task embedding (`shared`)."""

    def __init__(
        self, dim: int, num_experts: int, tasks: Sequence[str], shared: bool, embed_dim: int
    ) -> None:
        super().__init__()
        self.shared = shared
        if shared:
            self.moe_router = nn.Linear(dim + embed_dim, num_experts, bias=False)
            self.moe_task_embed = nn.ParameterDict(
                {t: nn.Parameter(torch.randn(embed_dim) * 0.02) for t in tasks}
            )
        else:
            self.moe_router = nn.ParameterDict(
                {t: nn.Parameter(torch.empty(num_experts, dim)) for t in tasks}
            )
            for w in self.moe_router.values():
                nn.init.kaiming_uniform_(w, a=5**0.5)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.moe_task_embed[task]] if self.shared else [self.moe_router[task]]

    def forward(self, x: Tensor, tasks: Sequence[str]) -> Tensor:
        """Logits (T x n x E) of tokens x (T x n x C), row block t routed for tasks[t]."""
        if self.shared:
            emb = torch.stack([self.moe_task_embed[t] for t in tasks])  # T x D
            emb = emb[:, None, :].expand(-1, x.shape[1], -1)
            return self.moe_router(torch.cat([x, emb], dim=-1))
        weights = torch.stack([self.moe_router[t] for t in tasks])  # T x E x C
        return torch.bmm(x, weights.transpose(1, 2))


class MoEMlp(nn.Module):
    """Drop-in replacement for a block's MLP: task-routed top-k mixture of `ExpertMLPs`.

    After each forward, `balance_loss` holds the per-task load-balancing losses (unweighted; the
    model multiplies them by `balance_weight`) and `load` the routed-token count per task
    (`load_tasks`) and expert (T x E). While training, `expert_usage` (tasks x E) keeps an EMA
    of the selections (`usage_momentum`); `kept` lists the experts held (all unless pruned by
    `mtl.extract`).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        tasks: Sequence[str],
        task_batch: TaskBatch,
        act: nn.Module,
        shared_router: bool = False,
        task_embed_dim: int = 64,
        noise_std: float = 1.0,
        balance_weight: float = 0.01,
        kept: Sequence[int] | None = None,
        usage_momentum: float = 0.95,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"MoE top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts, self.top_k, self.noise_std = num_experts, top_k, noise_std
        self.balance_weight = balance_weight
        self.task_batch = task_batch
        self.selection = KeptExperts(num_experts, kept)
        self.experts = ExpertMLPs(len(self.selection.kept), dim, hidden, act)
        self.router = TaskRouter(dim, num_experts, tasks, shared_router, task_embed_dim)
        self.tasks, self.usage_momentum = list(tasks), usage_momentum
        self.register_buffer("expert_usage", torch.zeros(len(self.tasks), num_experts))
        keep_usage_optional(self)
        self.balance_loss: dict[str, Tensor] = {}
        self.load: Tensor | None = None
        self.load_tasks: list[str] = []

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k experts and gates (T x n x k) of tokens x (T x n x C); records the losses."""
        tasks, E, k = self.task_batch.active, self.num_experts, self.top_k
        clean = self.router(x, tasks).float()
        std = self.noise_std / E if self.training else 0.0
        noisy = clean + torch.randn_like(clean) * std if std > 0 else clean
        probs = noisy.softmax(dim=-1)
        top_vals, top_idx = self.selection.choose(probs, min(k + 1, len(self.selection.kept)))
        gates, experts = top_vals[..., :k], top_idx[..., :k]
        full = torch.zeros_like(probs).scatter(-1, experts, gates)
        counts = (full > 0).sum(dim=1)  # T x E
        self.load, self.load_tasks = counts.detach(), list(tasks)
        if self.training:  # the usage of the global batch: every process keeps the same EMA
            rows = [self.tasks.index(task) for task in tasks]
            global_counts = all_reduce_sum(counts.detach().float())
            update_usage(self.expert_usage, rows, global_counts, self.usage_momentum)
        self.balance_loss = {}
        for t, task in enumerate(tasks):
            if std > 0 and k < E:
                top_noisy = noisy[t].topk(k + 1, dim=-1).values
                load = prob_in_top_k(clean[t], noisy[t], std, top_noisy, k).sum(0)
            else:
                load = counts[t].float()
            self.balance_loss[task] = cv_squared(full[t].sum(0)) + cv_squared(load)
        return experts, gates

    @property
    def kept(self) -> list[int]:
        return self.selection.kept

    def expert_parameters(self) -> list[str]:
        return ["experts.moe_w1", "experts.moe_b1", "experts.moe_w2", "experts.moe_b2"]

    def forward(self, x: Tensor) -> Tensor:
        rows = self.task_batch.by_task(x)  # T x n x C
        experts, gates = self.route(rows)
        experts = self.selection.local[experts]
        flat = rows.reshape(-1, rows.shape[-1])
        out = self.experts(flat, experts.reshape(-1, self.top_k), gates.reshape(-1, self.top_k))
        return out.reshape(x.shape)


class MoE(Adapter):
    """M3ViT-style mixture of experts in the MLPs of chosen ViT blocks.

    Args:
        num_experts: E.
        top_k: experts per token.
        hidden: expert hidden size; None: the embedding dimension (M3ViT).
        blocks: ``odd`` / ``even`` / ``all`` or a list of block indices.
        router: ``per_task`` (one router per task) or ``shared`` (one router fed a task
            embedding of size `task_embed_dim`).
        noise_std: routing noise while training is ``noise_std / E`` (0: none).
        balance_weight: weight of the load-balancing loss (per task, summed over layers).
        init_from_mlp: initialise the experts from the block's (pretrained) MLP.
        freeze_backbone: freeze the non-MoE backbone parameters except `trainable`.
        trainable: regexes of base parameter names kept trainable when `freeze_backbone`.
        kept_experts: {block index: kept expert ids} (written by `mtl.extract`); None: all.
        usage_momentum: EMA momentum of the expert usage that `mtl.extract` prunes by.
    """

    task_aware = True

    def __init__(
        self,
        num_experts: int = 16,
        top_k: int = 4,
        hidden: int | None = None,
        blocks: str | Sequence[int] = "odd",
        router: str = "per_task",
        task_embed_dim: int = 64,
        noise_std: float = 1.0,
        balance_weight: float = 0.01,
        init_from_mlp: bool = True,
        freeze_backbone: bool = False,
        trainable: Sequence[str] = (),
        kept_experts: dict[int, Sequence[int]] | None = None,
        usage_momentum: float = 0.95,
        task_aware: bool = True,
    ) -> None:
        super().__init__(task_aware)
        self.kept_experts = {int(b): list(e) for b, e in (kept_experts or {}).items()}
        self.usage_momentum = usage_momentum
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.blocks = blocks if isinstance(blocks, str) else list(blocks)
        self.router, self.task_embed_dim, self.noise_std = router, task_embed_dim, noise_std
        self.balance_weight, self.init_from_mlp = balance_weight, init_from_mlp
        self.freeze_backbone, self.trainable = freeze_backbone, list(trainable)

    def chosen(self, model: nn.Module) -> list[str]:
        """Names of the blocks whose MLP becomes a mixture."""
        names = [n for n in block_names(model) if hasattr(model.get_submodule(n), "mlp")]
        if isinstance(self.blocks, list):
            return [names[i] for i in self.blocks if -len(names) <= i < len(names)]
        first = {"odd": 1, "even": 0, "all": 0}.get(self.blocks, 0)
        return names[first :: 1 if self.blocks == "all" else 2]

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        problems = []
        if self.num_experts <= 0:
            problems.append(f"model.adapter.num_experts: {self.num_experts}; expected > 0")
        if not 0 < self.top_k <= max(self.num_experts, 1):
            problems.append(
                f"model.adapter.top_k: {self.top_k}; expected 1..num_experts ({self.num_experts})"
            )
        if self.router not in ("per_task", "shared"):
            problems.append(f"model.adapter.router: {self.router!r}; expected per_task or shared")
        if self.hidden is not None and self.hidden <= 0:
            problems.append(f"model.adapter.hidden: {self.hidden}; expected > 0 or null")
        if isinstance(self.blocks, str) and self.blocks not in ("odd", "even", "all"):
            problems.append(
                f"model.adapter.blocks: {self.blocks!r}; expected odd, even, all or"
                " a list of block indices"
            )
        vit = getattr(model, "model", model)
        if not (hasattr(vit, "blocks") and hasattr(vit, "patch_embed")):
            problems.append(
                "model.adapter: moe needs a plain ViT backbone (blocks with an mlp, e.g. "
                "vit_small_patch16_224); this backbone has none"
            )
        elif isinstance(self.blocks, list) and len(self.chosen(model)) < len(self.blocks):
            problems.append(
                f"model.adapter.blocks: {self.blocks}; this ViT has blocks 0.."
                f"{len(block_names(model)) - 1}"
            )
        for index, kept in self.kept_experts.items():
            if len(set(kept)) < self.top_k or not all(0 <= e < self.num_experts for e in kept):
                problems.append(
                    f"model.adapter.kept_experts: block {index}: {list(kept)}; expected at "
                    f"least top_k ({self.top_k}) distinct ids in 0..{self.num_experts - 1}"
                )
        return problems

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> TaskBatch:
        self._check(model, taps)
        task_batch = TaskBatch(tasks)
        names = self.chosen(model)
        index = {name: i for i, name in enumerate(block_names(model))}
        for name in names:
            block = model.get_submodule(name)
            mlp = block.mlp
            dim = mlp.fc1.in_features
            layer = MoEMlp(
                dim,
                self.hidden or dim,
                self.num_experts,
                self.top_k,
                tasks,
                task_batch,
                mlp.act,
                self.router == "shared",
                self.task_embed_dim,
                self.noise_std,
                self.balance_weight,
                self.kept_experts.get(index[name]),
                self.usage_momentum,
            )
            if self.init_from_mlp:  # (an extracted model's weights come from its checkpoint)
                layer.experts.init_from(mlp.fc1, mlp.fc2)
            block.mlp = layer
        if self.freeze_backbone:
            freeze_base(model, self.trainable)
        task_batch.attach(first_task_block(model, [f"{n}.mlp" for n in names]))
        return task_batch
