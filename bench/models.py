"""ViT multi-task models and the plain training step shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtl.models.adapters import Adapter
from mtl.models.backbone import Backbone
from mtl.models.decoders import HRNetDecoder
from mtl.models.multitask import MultiTaskModel

#: Heads of the NYUD-v2 tasks (semseg has 40 classes) and of the PASCAL-Context ones.
NYUD_HEADS = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
PASCAL_HEADS = {"semseg": 21, "parts": 7, "sal": 1, "normals": 3}

#: timm name and options of each benchmark backbone.
VITS = {
    "vit_tiny_4": ("vit_tiny_patch16_224", dict(patch_size=8, depth=4, out_indices=[0, 1, 2, 3])),
    "vit_small": ("vit_small_patch16_224", dict(out_indices=[2, 5, 8, 11])),
    "vit_base": ("vit_base_patch16_224", dict(out_indices=[2, 5, 8, 11])),
}


def vit_model(
    arch: str,
    size: Sequence[int],
    heads: Mapping[str, int] = PASCAL_HEADS,
    adapter: Adapter | None = None,
    hidden_channels: int = 32,
) -> MultiTaskModel:
    """A randomly initialised ViT (a key of `VITS`) with one HRNet-style head per task."""
    torch.manual_seed(0)
    name, extra = VITS[arch]
    backbone = Backbone(name, img_size=tuple(size), dynamic_img_size=True, **extra)
    decoder = partial(HRNetDecoder, hidden_channels=hidden_channels)
    return MultiTaskModel(backbone, decoder, dict(heads), adapter)


def train_step(model: MultiTaskModel, images: torch.Tensor) -> Callable[[], None]:
    """One step as a call: forward, sum of a square loss per head (+ auxiliary losses such as
    MoE balancing), backward, AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        preds = model(images)
        loss = sum(p.float().square().mean() for p in preds.values())
        loss = loss + sum(model.auxiliary_losses().values(), torch.zeros((), device=loss.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the operators ``fn`` runs, counted by `torch.utils.flop_counter.FlopCounterMode`
    (matrix products, convolutions, attention; a multiply-add counts 2; element-wise work and
    normalisation are not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(
    model: torch.nn.Module, images: torch.Tensor, tasks: Sequence[str] | None = None
) -> int:
    """Counted FLOPs of one inference forward pass of ``model(images, tasks)``."""
    model.eval()
    with torch.no_grad():
        return count_flops(lambda: model(images, tasks))
