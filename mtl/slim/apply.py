"""Make an existing model slimmable by module replacement (``conf/model/slim/on.yaml``).

The backbone's timm model and the task heads are built as usual; `Slimming.apply` then swaps
their layers for the slim layers of `mtl.slim.layers`, sharing the same parameters, so the
model code is not forked. Supported:

- timm ViT blocks: the MLP hidden size (``mlp.fc1`` rows, ``mlp.fc2`` columns) and the number of
  attention heads (``attn.qkv`` rows of every head kept in q, k and v; ``attn.proj`` columns);
  the embedding width stays fixed, so the shared features keep their channels at every width.
- timm ResNet blocks: the inner width of each residual block (``conv1``/``bn1``/``conv2``, and
  ``conv2``/``bn2``/``conv3`` in bottlenecks); stage outputs stay fixed.
- the ``conv`` and ``hrnet`` decoders: the hidden width (every hidden conv, its norm and the
  classifier's input).

BatchNorm becomes switchable (one per trained width), GroupNorm keeps its group size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from mtl.slim.layers import (
    SlimBatchNorm2d,
    SlimConv2d,
    SlimDim,
    SlimGroupNorm,
    SlimLinear,
)
from mtl.slim.widths import ENCODER, HEADS, export_dense, roles

#: Decoder classes (by name) that can be slimmed, with the function that slims one.
DecoderRecipe = Callable[[nn.Module, str, Sequence[float]], None]


def _norm(norm: nn.Module, role: str, dim: SlimDim, widths: Sequence[float]) -> nn.Module:
    if isinstance(norm, nn.BatchNorm2d):
        return SlimBatchNorm2d(norm, role, dim, list(widths))
    if isinstance(norm, nn.GroupNorm):
        return SlimGroupNorm(norm, role, dim)
    return norm  # Identity: nothing depends on the width


def _unit(norm: nn.Module) -> int:
    """Channels per group of a GroupNorm (a width keeps whole groups), else 1."""
    return norm.num_channels // norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


def _slim_conv_block(block: nn.Sequential, role: str, widths: Sequence[float], groups: int = 1):
    """conv-norm-act with a slim output; its input is slim in `groups` blocks (0: fixed)."""
    conv, norm = block[0], block[1]
    unit = _unit(norm)
    out = SlimDim(conv.out_channels, 1, unit)
    slim_in = SlimDim(conv.in_channels, groups, unit) if groups else None
    block[0] = SlimConv2d(conv, role, slim_in, out)
    block[1] = _norm(norm, role, out, widths)
    return out


def slim_conv_decoder(head: nn.Module, task: str, widths: Sequence[float]) -> None:
    out = _slim_conv_block(head.block, task, widths, groups=0)
    head.classifier = SlimConv2d(head.classifier, task, out, None)


def slim_hrnet_decoder(head: nn.Module, task: str, widths: Sequence[float]) -> None:
    for projection in head.projections:
        _slim_conv_block(projection, task, widths, groups=0)
    out = _slim_conv_block(head.fuse, task, widths, groups=len(head.projections))
    head.classifier = SlimConv2d(head.classifier, task, out, None)


DECODERS: dict[str, DecoderRecipe] = {
    "ConvDecoder": slim_conv_decoder,
    "HRNetDecoder": slim_hrnet_decoder,
}


# ---------------------------------------------------------------- backbones
def _vit_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "head_dim", "attn_dim"))


def _vit_mlp(module: nn.Module) -> bool:
    return isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(
        getattr(module, "fc2", None), nn.Linear
    )


def _resnet_block(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Conv2d) for a in ("conv1", "conv2")) and (
        isinstance(getattr(module, "bn1", None), nn.BatchNorm2d)
    )


def backbone_problems(model: nn.Module) -> list[str]:
    """Why the timm `model` cannot be slimmed (empty: it can)."""
    blocks = [m for m in model.modules() if _vit_attention(m) or _resnet_block(m)]
    if not blocks:
        return [
            f"model.backbone: {type(model).__name__} cannot be slimmed (model/slim=on); "
            "supported: timm ViTs (MLP hidden size, attention heads) and ResNets (block width)"
        ]
    problems = []
    for name, module in model.named_modules():
        if _vit_attention(module) and (
            getattr(module, "gate", None) is not None
            or not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)
        ):
            problems.append(
                f"model.backbone: attention {name} has a gate or a norm over all heads, "
                "which slimming (model/slim=on) does not support"
            )
            break
    return problems


def slim_backbone(model: nn.Module, widths: Sequence[float]) -> None:
    """Slim the timm `model` in place (ViT heads and MLPs, ResNet block widths)."""
    for module in list(model.modules()):
        if _vit_attention(module):
            heads = SlimDim(module.attn_dim, 1, module.head_dim)
            module.qkv = SlimLinear(
                module.qkv, ENCODER, None, SlimDim(3 * module.attn_dim, 3, module.head_dim)
            )
            module.proj = SlimLinear(module.proj, ENCODER, heads, None)
            setattr(module, HEADS, heads)
        elif _vit_mlp(module) and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            hidden = SlimDim(module.fc1.out_features)
            module.fc1 = SlimLinear(module.fc1, ENCODER, None, hidden)
            module.fc2 = SlimLinear(module.fc2, ENCODER, hidden, None)
        elif _resnet_block(module):
            inner = SlimDim(module.conv1.out_channels)
            module.conv1 = SlimConv2d(module.conv1, ENCODER, None, inner)
            module.bn1 = _norm(module.bn1, ENCODER, inner, widths)
            if isinstance(getattr(module, "conv3", None), nn.Conv2d):  # bottleneck
                middle = SlimDim(module.conv2.out_channels)
                module.conv2 = SlimConv2d(module.conv2, ENCODER, inner, middle)
                module.bn2 = _norm(module.bn2, ENCODER, middle, widths)
                module.conv3 = SlimConv2d(module.conv3, ENCODER, middle, None)
            else:
                module.conv2 = SlimConv2d(module.conv2, ENCODER, inner, None)


class Slimming:
    """The slimming recipe and its training rule (``model.slim``).

    Args:
        widths: the trained widths of the encoder and of every decoder (1.0 included).
        random_configs: k, the random configurations trained per step besides the full and
            the smallest one (the sandwich rule).
        distill_weight: weight of the configuration-invariant distillation loss (squared
            distance of each sub-network's backbone features to the full model's, the latter
            without gradient, relative to their mean square; `mtl.slim.training`).
        fixed: a width configuration (role -> width): the model is exported as the dense
            sub-network of these widths (set by ``python -m mtl.control`` in the checkpoints it
            writes); None: the slimmable model.
    """

    def __init__(
        self,
        widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        random_configs: int = 2,
        distill_weight: float = 1.0,
        fixed: Mapping[str, float] | None = None,
    ) -> None:
        if not widths or 1.0 not in widths or any(not 0 < w <= 1 for w in widths):
            raise ValueError(
                f"model.slim.widths: {list(widths)}; expected widths in (0, 1] including 1.0"
            )
        if random_configs < 0:
            raise ValueError(f"model.slim.random_configs: {random_configs}; expected >= 0")
        if distill_weight < 0:
            raise ValueError(f"model.slim.distill_weight: {distill_weight}; expected >= 0")
        self.widths = sorted(float(w) for w in widths)
        self.random_configs = int(random_configs)
        self.distill_weight = float(distill_weight)
        self.fixed = dict(fixed) if fixed else None

    def apply(self, model: nn.Module) -> None:
        """Slim a `MultiTaskModel` in place (then export it dense when `fixed` is set)."""
        slim_backbone(model.backbone.model, self.widths)
        for task, head in model.decoders.items():
            recipe = DECODERS.get(type(head).__name__)
            if recipe is None:
                raise ValueError(
                    f"model.decoder: {type(head).__name__} cannot be slimmed (model/slim=on); "
                    f"supported: {sorted(DECODERS)}"
                )
            recipe(head, task, self.widths)
        if self.fixed is not None:
            unknown = set(self.fixed) - set(roles(model))
            if unknown:
                raise ValueError(f"model.slim.fixed: unknown roles {sorted(unknown)}")
            export_dense(model, self.fixed)

    # ------------------------------------------------------------ configurations
    def full(self, model_roles: Sequence[str]) -> dict[str, float]:
        return dict.fromkeys(model_roles, 1.0)

    def smallest(self, model_roles: Sequence[str]) -> dict[str, float]:
        return dict.fromkeys(model_roles, self.widths[0])

    def sandwich(self, model_roles: Sequence[str], seed: int) -> list[dict[str, float]]:
        """The sub-networks trained besides the full model at one step: the smallest and
        `random_configs` random ones (each role's width drawn uniformly from `widths`); the
        same on every process for the same `seed`."""
        rng = random.Random(seed)
        drawn = [
            {r: rng.choice(self.widths) for r in model_roles} for _ in range(self.random_configs)
        ]
        return [self.smallest(model_roles), *drawn]
