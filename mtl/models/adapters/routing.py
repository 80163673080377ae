"""What the routed (mixture-of-experts) layers share: expert kernels computed on their own tokens
only, the kept-expert subset of an extracted model, the EMA of expert usage, and the
task-expert mutual-information loss of Mod-Squad.

A routed layer exposes ``kept`` (the original ids of the experts it holds), ``top_k``,
``expert_usage`` (tasks x all experts, an EMA of selection counts) and
``expert_parameters()`` (the names of its parameters whose first axis is the expert); that is
all `mtl.extract` needs to prune it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

#: Mod-Squad's constants: added to the softmax probabilities and inside the MI logarithm.
EPS = 1e-4


def grouped_linear(
    x: Tensor, experts: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``y[n, j] = weight[experts[n, j]] @ x[n(, j)] (+ bias)`` for every token n and slot j.

    `x` is M x C_in (one input per token, shared by its k slots) or M x k x C_in (one per slot),
    `experts` M x k local expert ids, `weight` E x C_out x C_in. Pairs are grouped per expert
    and each expert runs once on its own rows (torch has no grouped GEMM on CPU; this loop over
    experts is the portable replacement of Mod-Squad's CUDA kernel). Returns M x k x C_out.
    """
    m, k = experts.shape
    per_slot = x.dim() == 3
    rows = x.reshape(m * k, -1) if per_slot else x
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=weight.shape[0]).tolist()
    outs, start = [], 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pos = order[start : start + count]
        src = rows[pos] if per_slot else rows[pos // k]
        outs.append(F.linear(src, weight[e], None if bias is None else bias[e]))
        start += count
    grouped = torch.cat(outs)
    return grouped[torch.argsort(order)].reshape(m, k, -1)


def mutual_information_terms(joint: Tensor) -> Tensor:
    """Per task t, ``-sum_e P(t,e) log(P(t,e) / (P(t) P(e)) + 1e-4)`` for the joint table
    `joint` (T x E); their sum is Mod-Squad's MI loss (minimising it maximises the task-expert
    mutual information), with ``P(t) = sum_e P(t,e) + 1e-4`` and ``P(e) = sum_t P(t,e) + 1e-4``."""
    p_task = joint.sum(1, keepdim=True) + EPS
    p_expert = joint.sum(0, keepdim=True) + EPS
    return -(joint * torch.log(joint / (p_task * p_expert) + EPS)).sum(1)


class KeptExperts(nn.Module):
    """The subset of E experts a (pruned) layer holds: original id -> local slot, and the mask
    that keeps the others out of the top k. All E router outputs stay, so the softmax is the
    full model's and the pruned layer computes exactly what the full one did on every token
    whose top k lies inside the kept set."""

    def __init__(self, num_experts: int, kept: Sequence[int] | None) -> None:
        super().__init__()
        self.kept = sorted(set(range(num_experts) if kept is None else (int(e) for e in kept)))
        if not self.kept or not all(0 <= e < num_experts for e in self.kept):
            raise ValueError(f"kept experts {list(kept or [])} not within 0..{num_experts - 1}")
        local = torch.full((num_experts,), -1, dtype=torch.long)
        local[self.kept] = torch.arange(len(self.kept))
        self.register_buffer("local", local, persistent=False)
        self.pruned = len(self.kept) < num_experts

    def choose(self, probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k (gates, original expert ids) of `probs` among the kept experts."""
        if self.pruned:
            probs = probs.masked_fill(self.local < 0, -1.0)
        return probs.topk(k, dim=-1)


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: every process's loss uses the
    summed statistics, so each input's gradient is the sum of all processes' upstream gradients.

    Written here because torch's differentiable all-reduce (`torch.distributed.nn.functional`,
    deprecated, and the `_functional_collectives` one it points to) imports
    `torch.distributed.nn`, whose default arguments bind the world group when first imported
    after `init_process_group`: the group then outlives `destroy_process_group` and its threads
    abort the process at exit."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over DDP processes, with a gradient (the identity outside DDP)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _SumOverProcesses.apply(x)


def update_usage(usage: Tensor, rows: Sequence[int], counts: Tensor, momentum: float) -> None:
    """Mod-Squad's EMA of selections, in place: ``usage[t] = m usage[t] + (1 - m) counts``."""
    with torch.no_grad():
        index = torch.tensor(list(rows), device=usage.device)
        old = usage.index_select(0, index)
        usage.index_copy_(0, index, momentum * old + (1 - momentum) * counts.to(usage.dtype))


def _fill_usage(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    state_dict.setdefault(prefix + "expert_usage", module.expert_usage.clone())


def keep_usage_optional(module: nn.Module) -> None:
    """Let checkpoints written before ``expert_usage`` existed load (the EMA starts at zero)."""
    module._register_load_state_dict_pre_hook(_fill_usage, with_module=True)
