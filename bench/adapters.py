"""Cost of the backbone adapters: parameters, exact FLOPs, training-step time.

    python -m bench.adapters [--quick] [--size 128 128] [--batch-size 2]

Model: a ViT (quick: ViT-Tiny, 4 blocks, patch 8; else ViT-Small/16, 12 blocks) with HRNet-style
heads for 4 tasks, random init, CPU. Adapters as in ``conf/model/adapter`` (lora r8; mtlora
shared r64 + task r4 on the out_indices blocks; moe 16 experts top-4, hidden = embed dim, odd
blocks, a router per task; modsquad; mhr; polyhistor and polyhistor_lite; scalearn needs a
stage-1 checkpoint and is not measured). The extraction table compares a single-task model that
keeps n experts per MoE layer (`mtl.extract`) with the full model computing that one task.
FLOPs are counted with `torch.utils.flop_counter` (matrix products, convolutions, attention; a
multiply-add counts 2) for one forward pass. Step time: forward,
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
from mtl.models.adapters import MHR, LoRA, ModSquad, MoE, MTLoRA, Polyhistor
from mtl.models.adapters.modsquad import MoEAttention


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
        "modsquad": ModSquad(),
        "mhr": MHR(trainable=["norm"]),
        "polyhistor": Polyhistor(),
        "polyhistor_lite": Polyhistor(lite=True),
    }


def extraction_table(settings: Settings) -> Table:
    """Parameters and one-task FLOPs of single-task models keeping n experts per MoE layer
    against the full 4-task model computing that task."""
    images = settings.images()
    table = Table(
        "Extraction: single-task (semseg) models with n experts kept per layer "
        f"({settings.describe()})",
        ["adapter", "experts kept", "parameters", "params / full", "GFLOPs semseg", "FLOPs / full"],
        notes=[
            "n: the experts `python -m mtl.extract` keeps per layer (at least top-k; how many "
            "depends on the trained routing); the routers keep all their outputs. Full: the "
            "4-task model, FLOPs of its semseg-only forward."
        ],
    )
    semseg = {"semseg": 21}
    for name, make in (
        ("moe", lambda kept: MoE(num_experts=16, top_k=4, kept_experts=kept)),
        ("modsquad", lambda kept: ModSquad(kept_experts=kept)),
    ):
        full = vit_model(settings.arch, settings.size, adapter=make(None))
        params = sum(p.numel() for p in full.parameters())
        flops = forward_flops(full, images, ["semseg"])
        table.rows.append([name, "all", params, 1.0, flops / 1e9, 1.0])
        vit = full.backbone.model.model
        for fraction in ("top-k", "half"):
            kept = {}
            for i, block in enumerate(vit.blocks):
                layer = block.attn if isinstance(block.attn, MoEAttention) else block.mlp
                if not hasattr(layer, "kept"):
                    continue  # a dense block
                total = len(layer.kept)
                kept[i] = list(range(layer.top_k if fraction == "top-k" else total // 2))
            small = vit_model(settings.arch, settings.size, semseg, adapter=make(kept))
            n = sum(p.numel() for p in small.parameters())
            f = forward_flops(small, images)
            table.rows.append([name, fraction, n, n / params, f / 1e9, f / flops])
    return table


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
    print(extraction_table(settings).markdown())


if __name__ == "__main__":
    main()
