"""MLoRE: a mixture of low-rank convolutional experts per feature level (Yang et al., CVPR 2024).

Per level: a 1x1 fusion conv, then two stacked `MoEBlock`s applied per task; the levels are
fused by a per-task softmax mask, upsampled x4 and read by a `ConvHead` per task. The experts and
one 3x3 conv of each block are shared by all tasks; routers, gates and the rest are per task.
Written here because no library provides it; the layout follows the authors' release
(YuqiYang213/MLoRE, ``models/transformers/MLoRE.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mtl.models.decoders.base import MultiTaskDecoder, TaskInputs


class LowRankConv(nn.Module):
    """A 3x3 conv to `rank` channels then a 1x1 conv back, both with bias (MLoRE's LoraBlock)."""

    def __init__(self, channels: int, rank: int, expert_init: bool = False) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, rank, 3, padding=1)
        self.up = nn.Conv2d(rank, channels, 1)
        if expert_init:  # the experts' init: Kaiming-uniform (a = sqrt 5) weights, zero biases
            for conv in (self.down, self.up):
                nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def folded(self) -> tuple[Tensor, Tensor]:
        """The single 3x3 conv (weight, bias) equal to this pair."""
        up = self.up.weight[:, :, 0, 0]
        weight = torch.einsum("or,rikl->oikl", up, self.down.weight)
        return weight, up @ self.down.bias + self.up.bias


def _channel_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm over the channels of an NCHW map."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Router(nn.Module):
    """Per-image routing logits from a block's input: a channel branch (1x1 conv, LayerNorm,
    GELU, 1x1 conv, spatial mean) and a spatial-attention branch (a Linear over the `tokens`
    positions, LayerNorm, GELU, 1x1 conv), concatenated and mapped to ``2E + 1`` logits: E
    route logits, E noise scales, and the mixing weight of the task-specific path."""

    def __init__(self, channels: int, tokens: int, experts: int) -> None:
        super().__init__()
        quarter = channels // 4
        self.channel_in = nn.Conv2d(channels, quarter, 1)
        self.channel_norm = nn.LayerNorm(quarter)
        self.channel_out = nn.Conv2d(quarter, quarter, 1)
        self.spatial = nn.Linear(tokens, 1)  # fixes the token grid
        nn.init.trunc_normal_(self.spatial.weight, std=0.02)
        nn.init.zeros_(self.spatial.bias)
        self.spatial_norm = nn.LayerNorm(channels)
        self.spatial_out = nn.Conv2d(channels, quarter, 1)
        self.logits = nn.Conv2d(2 * quarter, 2 * experts + 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        feat = self.channel_out(F.gelu(_channel_norm(self.channel_norm, self.channel_in(x))))
        feat = feat.mean(dim=(2, 3), keepdim=True)
        spatial = self.spatial(x.flatten(2)).reshape(n, -1)  # (n, C)
        spatial = F.gelu(self.spatial_norm(spatial)).reshape(n, -1, 1, 1)
        return self.logits(torch.cat([feat, self.spatial_out(spatial)], dim=1)).flatten(1)


def noisy_top_k(logits: Tensor, topk: int, pre_softmax: bool, training: bool) -> Tensor:
    """Gates (n, E) from route logits and noise scales ``logits = [route | scale]`` (n, 2E).

    In training, N(0, 1) noise times the raw scale is added to the route logits. `pre_softmax`:
    the E - topk smallest logits are dropped, then softmax (gates sum to 1); otherwise softmax,
    then the E - topk smallest probabilities are zeroed without renormalising.
    """
    route, scale = logits.chunk(2, dim=1)
    if training:
        route = route + torch.randn_like(route) * scale
    drop = route.shape[1] - topk
    if pre_softmax:
        dropped = _smallest(route, drop)
        return route.masked_fill(dropped, float("-inf")).softmax(dim=1)  # exp(-inf) = 0 exactly
    probs = route.softmax(dim=1)
    return probs.masked_fill(_smallest(probs, drop), 0.0)


def _smallest(values: Tensor, k: int) -> Tensor:
    """A mask of the `k` smallest entries of each row."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    return mask.scatter(1, values.topk(k, dim=1, largest=False).indices, True)


class TaskBranch(nn.Module):
    """One task's part of a `MoEBlock`: input conv, router, task-specific low-rank path, the
    norms and the output conv."""

    def __init__(self, channels: int, tokens: int, experts: int, spe_rank: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.router = Router(channels, tokens, experts)
        self.specific = LowRankConv(channels, spe_rank)
        self.norm_experts = nn.BatchNorm2d(channels)
        self.norm = nn.BatchNorm2d(channels)
        self.conv_out = nn.Conv2d(channels, channels, 1)


class MoEBlock(nn.Module):
    """``conv_out(GELU(BN(BN_e(sum_i g_i expert_i(y)) + prob_mix * specific(y) + shared(y'))))``
    with ``y = conv_in(x)`` and ``y'`` = y detached (the shared 3x3 conv sends no gradient back)."""

    def __init__(
        self,
        channels: int,
        tasks: Sequence[str],
        tokens: int,
        rank_list: Sequence[int],
        spe_rank: int,
        topk: int,
        pre_softmax: bool,
    ) -> None:
        super().__init__()
        self.ranks = [int(r) for r in rank_list]
        self.topk = topk
        self.pre_softmax = pre_softmax
        self.experts = nn.ModuleList(LowRankConv(channels, r, expert_init=True) for r in self.ranks)
        #: the expert of each channel of the stacked first convs (gate lookup, no copy per call)
        index = torch.tensor([i for i, r in enumerate(self.ranks) for _ in range(r)])
        self.register_buffer("expert_of_channel", index, persistent=False)
        self.shared = nn.Conv2d(channels, channels, 3, padding=1)
        self.branches = nn.ModuleDict(
            {t: TaskBranch(channels, tokens, len(self.ranks), spe_rank) for t in tasks}
        )
        #: per task: the folded per-image pieces after `reparameterize` (see there)
        self.folded: dict[str, dict[str, Tensor]] | None = None

    def _mixture(self, y: Tensor, gates: Tensor) -> Tensor:
        """``sum_i g_i expert_i(y)`` in two convolutions: the experts' first convs stacked, each
        expert's channels scaled by its gate, then the second convs side by side."""
        down_w = torch.cat([e.down.weight for e in self.experts])
        down_b = torch.cat([e.down.bias for e in self.experts])
        hidden = F.conv2d(y, down_w, down_b, padding=1)
        hidden = hidden * gates[:, self.expert_of_channel, None, None]
        up_w = torch.cat([e.up.weight for e in self.experts], dim=1)
        up_b = torch.stack([e.up.bias for e in self.experts])  # (E, C)
        return F.conv2d(hidden, up_w) + (gates @ up_b)[:, :, None, None]

    def forward(self, x: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """The block's output for `task` and the gates (n, E) it used."""
        branch = self.branches[task]
        y = branch.conv_in(x)
        logits = branch.router(y)
        experts = len(self.ranks)
        gates = noisy_top_k(logits[:, : 2 * experts], self.topk, self.pre_softmax, self.training)
        mix = logits[:, 2 * experts, None, None, None]  # raw, un-activated
        if self.folded is None:
            out = (
                branch.norm_experts(self._mixture(y, gates))
                + branch.specific(y) * mix
                + self.shared(y.detach())
            )
            out = branch.norm(out)
        else:
            out = self._folded_conv(y, gates, mix, self.folded[task])
        return branch.conv_out(F.gelu(out)), gates

    # ----------------------------------------------------------- inference re-parameterisation
    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold, per task, every 3x3-1x1 pair and both BatchNorms (eval statistics) so that the
        experts, the task-specific and the shared paths run as one 3x3 conv per image."""
        experts = [e.folded() for e in self.experts]
        expert_w = torch.stack([w for w, _ in experts])  # (E, C, C, 3, 3)
        expert_b = torch.stack([b for _, b in experts])
        self.folded = {}
        for task, branch in self.branches.items():
            a1, c1 = _bn_affine(branch.norm_experts)
            a2, c2 = _bn_affine(branch.norm)
            spec_w, spec_b = branch.specific.folded()
            self.folded[task] = {
                "experts_w": expert_w * (a2 * a1)[None, :, None, None, None],
                "experts_b": expert_b * (a2 * a1),
                "specific_w": spec_w * a2[:, None, None, None],
                "specific_b": spec_b * a2,
                "shared_w": self.shared.weight * a2[:, None, None, None],
                "shared_b": (self.shared.bias + c1) * a2 + c2,
            }

    def _folded_conv(
        self, y: Tensor, gates: Tensor, mix: Tensor, parts: dict[str, Tensor]
    ) -> Tensor:
        n, c, h, w = y.shape
        mix = mix.reshape(n, 1)
        weight = (
            torch.einsum("ne,eoikl->noikl", gates, parts["experts_w"])
            + mix[:, :, None, None, None] * parts["specific_w"]
            + parts["shared_w"]
        )
        bias = gates @ parts["experts_b"] + mix * parts["specific_b"] + parts["shared_b"]
        out = F.conv2d(
            y.reshape(1, n * c, h, w), weight.reshape(n * c, c, 3, 3), bias.reshape(-1),
            padding=1, groups=n,
        )  # fmt: skip
        return out.reshape(n, c, h, w)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - scale * bn.running_mean


class ConvHead(nn.Sequential):
    """3x3 conv + BN + GELU, then a 1x1 conv to the task's channels (MLoRE's and TaskPrompter's
    head)."""

    def __init__(self, channels: int, out_channels: int) -> None:
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.trunc_normal_(conv.weight, std=0.02)
        pred = nn.Conv2d(channels, out_channels, 1)
        nn.init.normal_(pred.bias, std=0.02)
        super().__init__(conv, nn.BatchNorm2d(channels), nn.GELU(), pred)


class LevelMask(nn.Sequential):
    """Per-pixel logits over the levels from their concatenation: 1x1 conv + BN + GELU + 3x3."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__(
            nn.Conv2d(channels * levels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.Conv2d(channels, levels, 3, padding=1),
        )


class MLoRE(MultiTaskDecoder):
    """MLoRE decoder over the backbone's feature levels (MLoRE taps a ViT at 4 levels).

    Levels at other strides (a CNN or Swin) are resized to the last level's grid, a choice of
    this project: MLoRE itself reads one ViT token grid.

    Args:
        in_channels, in_strides, task_channels: given by the model.
        image_size: the (H, W) every input has; the router's spatial Linear has one weight per
            position of the last level's grid (``ceil(H / stride) * ceil(W / stride)``), so other
            sizes are refused (evaluate padded to this size).
        embed_dim: D, the width of every level after its fusion conv.
        rank_list: the ranks of the E shared low-rank experts.
        spe_rank: rank of each task's own low-rank path.
        topk: experts kept per image.
        pre_softmax: drop experts before the softmax (gates sum to 1) or after (they do not).
        load_balancing: weight of the cv² load-balancing loss (summed over all MoE blocks).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        task_channels: Mapping[str, int],
        image_size: Sequence[int],
        embed_dim: int = 192,
        rank_list: Sequence[int] = tuple(range(8, 65, 4)),
        spe_rank: int = 32,
        topk: int = 9,
        pre_softmax: bool = False,
        load_balancing: float = 1e-4,
    ) -> None:
        super().__init__()
        problems = parameter_problems(rank_list, topk, embed_dim)
        if problems:
            raise ValueError("; ".join(problems))
        self._tasks = list(task_channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        stride = int(in_strides[-1])
        self.grid = tuple(-(-size // stride) for size in self.image_size)
        tokens = self.grid[0] * self.grid[1]
        self.load_balancing = float(load_balancing)
        self.fuse = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                MoEBlock(embed_dim, self._tasks, tokens, rank_list, spe_rank, topk, pre_softmax)
                for _ in in_channels
            )

        self.first, self.second = stack(), stack()
        levels = len(in_channels)
        self.masks = nn.ModuleDict({t: LevelMask(embed_dim, levels) for t in self._tasks})
        self.heads = nn.ModuleDict(
            {t: ConvHead(embed_dim, channels) for t, channels in task_channels.items()}
        )
        self._gates: list[dict[str, Tensor]] = []

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @staticmethod
    def config_problems(cfg: Any) -> list[str]:
        """The decoder node's problems, found before training (``mtl.config``)."""
        node = cfg.model.decoder
        problems = parameter_problems(
            node.get("rank_list"), node.get("topk"), node.get("embed_dim")
        )
        size, data_size = node.get("image_size"), cfg.data.get("image_size")
        if size is None or data_size is None or list(size) != list(data_size):
            problems.append(
                f"model.decoder.image_size: {_plain(size)} differs from data.image_size "
                f"{_plain(data_size)}; MLoRE's router has one weight per position of the "
                "feature grid of its configured input size, so train and evaluate at one "
                "size: leave model.decoder.image_size at its default ${data.image_size}"
            )
        patch = _vit_patch(cfg.model.get("backbone") or {})
        if patch and data_size is not None and any(int(v) % patch for v in data_size):
            problems.append(
                f"data.image_size: {_plain(data_size)} is not a multiple of the ViT patch size "
                f"{patch}; MLoRE's router needs the exact token grid of the input"
            )
        return problems

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        modules = [self.masks[task], self.heads[task]]
        modules += [block.branches[task] for block in (*self.first, *self.second)]
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _check_grid(self, feature: Tensor) -> None:
        if tuple(feature.shape[-2:]) != self.grid:
            raise ValueError(
                f"MLoRE is configured for {self.image_size[0]}x{self.image_size[1]} inputs "
                f"(model.decoder.image_size; a {self.grid[0]}x{self.grid[1]} feature grid, which "
                f"its router's spatial Linear needs), got a {feature.shape[-2]}x"
                f"{feature.shape[-1]} grid: pad every input to that size"
            )

    def forward(self, inputs: TaskInputs) -> dict[str, Tensor]:
        tasks = list(inputs)
        fused: dict[int, list[Tensor]] = {}  # per distinct feature list (one when shared)
        first_gates = [dict() for _ in self.first]
        second_gates = [dict() for _ in self.second]
        preds = {}
        for task in tasks:
            features = inputs[task]
            key = id(features[-1])
            if key not in fused:
                self._check_grid(features[-1])
                fused[key] = [
                    fuse(F.interpolate(f, size=self.grid, mode="bilinear", align_corners=False)
                         if tuple(f.shape[-2:]) != self.grid else f)
                    for fuse, f in zip(self.fuse, features, strict=True)
                ]  # fmt: skip
            levels = []
            for i, x in enumerate(fused[key]):
                x, first_gates[i][task] = self.first[i](x, task)
                x, second_gates[i][task] = self.second[i](x, task)
                levels.append(x)
            weights = self.masks[task](torch.cat(levels, dim=1)).softmax(dim=1)
            out = sum(weights[:, i : i + 1] * level for i, level in enumerate(levels))
            out = F.interpolate(out, scale_factor=4, mode="bilinear", align_corners=False)
            preds[task] = self.heads[task](out)
        self._gates = first_gates + second_gates
        return preds

    def load_balancing_loss(self) -> Tensor | None:
        """Sum over MoE blocks of cv² = (std / mean)² of the gates averaged over the images and
        tasks of the last forward (unbiased std, as the authors' loss)."""
        if not self._gates:
            return None
        total = 0.0
        for gates in self._gates:
            load = torch.cat(list(gates.values())).mean(dim=0)
            total = total + (load.std() / load.mean()) ** 2
        return total

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """The weighted load-balancing loss, split equally among the last forward's tasks."""
        loss = self.load_balancing_loss()
        if loss is None or self.load_balancing == 0:
            return {}
        tasks = list(self._gates[0])
        return {t: self.load_balancing * loss / len(tasks) for t in tasks}

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Inference form (eval mode only): every MoE block's low-rank pairs and BatchNorms fold
        into one 3x3 conv per image (routing stays dynamic), and the conv-BN pairs of the level
        masks and heads into single convs. Irreversible: re-build to train on."""
        if self.training:
            raise RuntimeError("MLoRE.reparameterize() folds eval statistics: call .eval() first")
        for block in (*self.first, *self.second):
            block.reparameterize()
        for seq in (*self.masks.values(), *self.heads.values()):
            seq[0] = fuse_conv_bn_eval(seq[0], seq[1])
            seq[1] = nn.Identity()

    def train(self, mode: bool = True) -> MLoRE:
        if mode and any(b.folded is not None for b in (*self.first, *self.second)):
            raise RuntimeError("a re-parameterised MLoRE is for inference only")
        return super().train(mode)


def _vit_patch(backbone: Any) -> int | None:
    """The patch size of a timm ViT backbone node (``patch_size`` or the name's
    ``patch<N>``); None for other backbones."""
    name = str(backbone.get("name") or "")
    if not name.startswith(("vit_", "deit")):
        return None
    if backbone.get("patch_size"):
        return int(backbone.get("patch_size"))
    found = re.search(r"patch(\d+)", name)
    return int(found.group(1)) if found else None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def parameter_problems(rank_list: Any, topk: Any, embed_dim: Any) -> list[str]:
    """What is wrong with MLoRE's expert settings (one message per key)."""
    problems = []
    ranks = list(rank_list) if isinstance(rank_list, Sequence | list) else None
    if not ranks or not all(isinstance(r, int) and r > 0 for r in ranks):
        problems.append(f"model.decoder.rank_list: {rank_list!r}; expected a list of integers > 0")
    elif not (isinstance(topk, int) and 1 <= topk <= len(ranks)):
        problems.append(
            f"model.decoder.topk: {topk!r}; expected an integer from 1 to {len(ranks)} "
            "(the number of experts in model.decoder.rank_list)"
        )
    if not (isinstance(embed_dim, int) and embed_dim >= 4):
        problems.append(f"model.decoder.embed_dim: {embed_dim!r}; expected an integer >= 4")
    return problems
