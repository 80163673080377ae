"""`polyhistor` / `polyhistor_lite` (Liu et al., NeurIPS 2022): per-task bottleneck adapters
whose weights a decomposed hypernetwork generates from a task and a layer embedding, expanded
to each stage's width by layer-wise scaling kernels.

No code was released; the mechanism below follows the paper's description and is this
framework's reading of it (a design choice where the paper is not explicit):

- Adapter (every ViT / Swin block, per task): the block's MLP output y becomes
  ``y + up(gelu(down(y)))``, down: width -> r, up: r -> width, no bias.
- Decomposed hypernetwork: template weights of the narrowest width d0 (Swin-T: 96),
  ``down0(t, j) = T_down(e_t) @ L_down(l_j)`` (d0 x k times k x r) and
  ``up0(t, j) = L_up(l_j) @ T_up(e_t)`` (r x k times k x d0), T from the task embedding e_t,
  L from the layer embedding l_j (linear maps; k = `hyper_rank`). The lite hypernetwork
  (`lite`) makes the task side a shared d0 x k basis whose k columns the task embedding only
  rescales, instead of generating the whole factor.
- Layer-wise scaling kernels: a stage of width m * d0 uses ``kron(K_j, down0)`` with a learned
  K_j of m x 1 (``kron(K'_j, up0)``, 1 x m, for up), initialised to ones (`kron_expand`).
- ``L_up`` starts at zero, so the adapted model starts as the base model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.models.adapters.base import Adapter
from mtl.models.adapters.task_batch import TaskBatch, block_names


def kron_expand(template: Tensor, kernel: Tensor) -> Tensor:
    """``kron(kernel, template)`` over the last two axes (leading axes batched): a template of
    a x b and a kernel of m x n give ma x nb, block (i, j) = kernel[i, j] * template."""
    m, n = kernel.shape[-2:]
    a, b = template.shape[-2:]
    out = kernel[..., :, None, :, None] * template[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], m * a, n * b)


class Hypernetwork(nn.Module):
    """Template adapter weights (d0-wide) of each task for each layer."""

    def __init__(
        self,
        tasks: Sequence[str],
        layers: int,
        width: int,
        rank: int,
        hyper_rank: int,
        embed_dim: int,
        lite: bool,
    ) -> None:
        super().__init__()
        self.width, self.rank, self.k, self.lite = width, rank, hyper_rank, lite
        self.polyhistor_task = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(embed_dim)) for t in tasks}
        )
        self.polyhistor_layer = nn.Parameter(torch.randn(layers, embed_dim))
        k = hyper_rank
        if lite:  # a shared basis; the task embedding scales its k columns
            self.polyhistor_basis_down = nn.Parameter(torch.randn(width, k) / math.sqrt(k))
            self.polyhistor_basis_up = nn.Parameter(torch.randn(k, width) / math.sqrt(k))
            self.polyhistor_task_down = nn.Linear(embed_dim, k)
            self.polyhistor_task_up = nn.Linear(embed_dim, k)
        else:
            self.polyhistor_task_down = nn.Linear(embed_dim, width * k)
            self.polyhistor_task_up = nn.Linear(embed_dim, k * width)
        self.polyhistor_layer_down = nn.Linear(embed_dim, k * rank)
        self.polyhistor_layer_up = nn.Linear(embed_dim, rank * k)
        nn.init.zeros_(self.polyhistor_layer_up.weight)
        nn.init.zeros_(self.polyhistor_layer_up.bias)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.polyhistor_task[task]]

    def _task_factors(self, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        e = torch.stack([self.polyhistor_task[t] for t in tasks])  # T x D
        t, d0, k = e.shape[0], self.width, self.k
        if self.lite:
            down = self.polyhistor_basis_down * self.polyhistor_task_down(e)[:, None, :]
            up = self.polyhistor_task_up(e)[:, :, None] * self.polyhistor_basis_up
            return down, up  # T x d0 x k, T x k x d0
        return self.polyhistor_task_down(e).view(t, d0, k), self.polyhistor_task_up(e).view(
            t, k, d0
        )

    def forward(self, tasks: Sequence[str], layer: int) -> tuple[Tensor, Tensor]:
        """down0 (T x d0 x r) and up0 (T x r x d0) of `layer` for `tasks`; the down weight is
        scaled by 1 / sqrt(k d0) so that a unit-variance input gives an O(1) bottleneck."""
        task_down, task_up = self._task_factors(tasks)
        emb = self.polyhistor_layer[layer]
        # F.linear, not the modules: a module called on a view of a parameter trips the
        # module tracker of FlopCounterMode under no_grad
        down_map, up_map = self.polyhistor_layer_down, self.polyhistor_layer_up
        layer_down = F.linear(emb, down_map.weight, down_map.bias).view(self.k, self.rank)
        layer_up = F.linear(emb, up_map.weight, up_map.bias).view(self.rank, self.k)
        down = task_down @ layer_down / math.sqrt(self.k * self.width)
        return down, layer_up @ task_up


class PolyhistorMlp(nn.Module):
    """A block's MLP followed by the per-task generated bottleneck adapter."""

    def __init__(
        self, mlp: nn.Module, hyper: Hypernetwork, layer: int, scale: int, task_batch: TaskBatch
    ) -> None:
        super().__init__()
        self.mlp, self.layer, self.task_batch = mlp, layer, task_batch
        object.__setattr__(self, "hyper", hyper)  # shared, registered once (by the model)
        self.polyhistor_kernel_down = nn.Parameter(torch.ones(scale, 1))
        self.polyhistor_kernel_up = nn.Parameter(torch.ones(1, scale))

    def weights(self, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """This layer's down (T x width x r) and up (T x r x width) weights."""
        down, up = self.hyper(tasks, self.layer)
        return (
            kron_expand(down, self.polyhistor_kernel_down),
            kron_expand(up, self.polyhistor_kernel_up),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(x)
        down, up = self.weights(self.task_batch.active)
        rows = self.task_batch.by_task(y)
        h = F.gelu(torch.bmm(rows, down.to(y.dtype)))
        return y + torch.bmm(h, up.to(y.dtype)).reshape(y.shape)


class Polyhistor(Adapter):
    """Hypernetwork-generated per-task adapters after every block's MLP (ViT and Swin).

    Args:
        rank: adapter bottleneck r.
        hyper_rank: k, the inner size of the task x layer factorisation.
        embed_dim: size of the task and layer embeddings.
        lite: the lite hypernetwork (Polyhistor-Lite).
        freeze_backbone: freeze the backbone except `trainable` (the adapters always train).
        trainable: regexes of backbone parameter names that stay trainable.
    """

    task_aware = True

    def __init__(
        self,
        rank: int = 32,
        hyper_rank: int = 8,
        embed_dim: int = 64,
        lite: bool = False,
        freeze_backbone: bool = True,
        trainable: Sequence[str] = (),
        task_aware: bool = True,
    ) -> None:
        super().__init__(task_aware)
        self.rank, self.hyper_rank, self.embed_dim, self.lite = rank, hyper_rank, embed_dim, lite
        self.freeze_backbone, self.trainable = freeze_backbone, list(trainable)

    def _widths(self, model: nn.Module) -> list[int]:
        return [model.get_submodule(n).mlp.fc1.in_features for n in block_names(model)]

    def problems(self, model: nn.Module, taps: Sequence[str]) -> list[str]:
        problems = [
            f"model.adapter.{key}: {getattr(self, key)}; expected a positive integer"
            for key in ("rank", "hyper_rank", "embed_dim")
            if getattr(self, key) <= 0
        ]
        names = block_names(model)
        if not names or not all(hasattr(model.get_submodule(n), "mlp") for n in names):
            return [
                *problems,
                "model.adapter: polyhistor needs a ViT or Swin backbone (transformer blocks "
                "with an mlp); this backbone has none",
            ]
        widths = self._widths(model)
        if any(w % min(widths) for w in widths):
            problems.append(
                f"model.adapter: polyhistor needs block widths that are multiples of the "
                f"narrowest ({sorted(set(widths))})"
            )
        return problems

    def apply(self, model: nn.Module, taps: Sequence[str], tasks: Sequence[str]) -> TaskBatch:
        self._check(model, taps)
        batch = TaskBatch(tasks)
        names = block_names(model)
        widths = self._widths(model)
        d0 = min(widths)
        hyper = Hypernetwork(
            tasks, len(names), d0, self.rank, self.hyper_rank, self.embed_dim, self.lite
        )
        for j, (name, width) in enumerate(zip(names, widths, strict=True)):
            block = model.get_submodule(name)
            block.mlp = PolyhistorMlp(block.mlp, hyper, j, width // d0, batch)
        model.get_submodule(names[0]).mlp.polyhistor_hyper = hyper  # its one registration
        keep = [re.compile(p) for p in self.trainable]
        for name, param in model.named_parameters():
            adapter = "polyhistor_" in name
            base_kept = not self.freeze_backbone or any(k.search(name) for k in keep)
            param.requires_grad_(adapter or base_kept)
        batch.attach(model.get_submodule(names[0]))
        return batch
