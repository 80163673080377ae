"""Cost of the backbone adapters: parameters, exact FLOPs, training-step time.

    python -m bench.adapters [--quick] [--size 128 128] [--batch-size 2]

Model: a ViT (quick: ViT-Tiny, 4 blocks, patch 8; else ViT-Small/16, 12 blocks) with HRNet-style
heads for 4 tasks, random init, CPU. Adapters as in ``conf/model/adapter`` (lora r8; mtlora
shared r64 + task r4 on the out_indices blocks; moe 16 experts top-4, hidden = embed dim, odd
blocks, a router per task). FLOPs are counted with `torch.utils.flop_counter` (matrix products,
convolutions, attention; a multiply-add counts 2) for one forward pass. Step time: forward,
backward of the summed losses (+ MoE balancing), AdamW step; median of repetitions after a
warm-up, as a ratio to no adapter measured in the same run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from bench.models import forward_flops, train_step, vit_model
from bench.table import Table
from bench.timing import median_seconds
from mtl.models.adapters import LoRA, MoE, MTLoRA


@dataclass
class Settings:
    """Backbone, input size, batch and timing repetitions of the adapter benchmarks."""

    arch: str = "vit_small"
    size: tuple[int, int] = (224, 224)
    batch_size: int = 2
    repeats: int = 5
    experts: tuple[int, ...] = (4, 8, 16, 32)
    top_k: tuple[int, ...] = (1, 2, 4)

    @classmethod
    def quick(cls) -> Settings:
        return cls(arch="vit_tiny_4", size=(64, 64), repeats=3, experts=(4, 8, 16))

    def images(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch_size, 3, *self.size, generator=g)

    def describe(self) -> str:
        arch = {"vit_tiny_4": "ViT-Tiny/8, 4 blocks", "vit_small": "ViT-Small/16"}[self.arch]
        return f"{arch}, {self.size[0]}x{self.size[1]}, batch {self.batch_size}"


def adapters() -> dict[str, object]:
    """The adapters of ``conf/model/adapter`` with their default options."""
    return {
        "none": None,
        "lora": LoRA(rank=8, alpha=16, trainable=["norm"]),
        "mtlora": MTLoRA(trainable=["norm"]),
        "moe": MoE(num_experts=16, top_k=4),
    }


def cost_table(settings: Settings) -> Table:
    """Parameters, FLOPs (all tasks, semseg only) and step-time ratio of every adapter."""
    images = settings.images()
    table = Table(
        f"Adapters: parameters, FLOPs, step time ({settings.describe()}, 4 tasks)",
        [
            "adapter",
            "trainable",
            "total",
            "trainable backbone",
            "GFLOPs all tasks",
            "GFLOPs semseg only",
            "one / all",
            "step time / none",
        ],
        notes=[
            "FLOPs: one forward pass, counted by torch.utils.flop_counter (matrix products, "
            "convolutions, attention; multiply-add = 2). Step: forward, backward, AdamW; "
            f"median of {settings.repeats} after a warm-up."
        ],
    )
    base = None
    for name, adapter in adapters().items():
        model = vit_model(settings.arch, settings.size, adapter=adapter)
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        backbone = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
        every, one = forward_flops(model, images), forward_flops(model, images, ["semseg"])
        seconds = median_seconds(train_step(model, images), settings.repeats)
        base = base or seconds
        table.rows.append(
            [name, trainable, total, backbone, every / 1e9, one / 1e9, one / every, seconds / base]
        )
    return table


def moe_table(settings: Settings) -> Table:
    """Backbone FLOPs (semseg only) of MoE with E experts and top-k, as a ratio to dense."""
    images = settings.images()
    dense = forward_flops(vit_model(settings.arch, settings.size).backbone, images)
    ks = settings.top_k
    table = Table(
        "MoE: backbone FLOPs (one task) with the number of experts E and top-k",
        ["E", *(f"GFLOPs k={k}" for k in ks), *(f"k={k} / dense" for k in ks)],
        notes=[f"Dense backbone (no adapter): {dense / 1e9:.3f} GFLOPs ({settings.describe()})."],
    )
    for e in settings.experts:
        counts = []
        for k in settings.top_k:
            if k > e:
                counts.append(None)
                continue
            model = vit_model(settings.arch, settings.size, adapter=MoE(num_experts=e, top_k=k))
            model.eval()
            counts.append(forward_flops(model.backbone, images, ["semseg"]))
        cells = ["" if c is None else c / 1e9 for c in counts]
        ratios = ["" if c is None else c / dense for c in counts]
        table.rows.append([e, *cells, *ratios])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-Tiny, 4 blocks; < 1 minute")
    parser.add_argument("--size", type=int, nargs=2)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    settings = Settings.quick() if args.quick else Settings()
    settings.size = tuple(args.size or settings.size)
    settings.batch_size = args.batch_size or settings.batch_size
    settings.repeats = args.repeats or settings.repeats
    torch.set_num_threads(max(torch.get_num_threads() // 2, 1))
    print(cost_table(settings).markdown())
    print(moe_table(settings).markdown())


if __name__ == "__main__":
    main()
