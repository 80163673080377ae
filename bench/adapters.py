"""Cost of the backbone adapters: parameters, exact FLOPs, training-step time.

    python bench/adapters.py [--quick] [--size 128 128] [--batch-size 4]

Model: a ViT (quick: ViT-Tiny, 4 blocks, patch 8; else ViT-Small/16, 12 blocks) with HRNet-style
heads for 4 tasks, random init, CPU. Adapters as in ``conf/model/adapter`` (lora r8; mtlora
shared r64 + task r4 on the out_indices blocks; moe 16 experts top-4, hidden = embed dim, odd
blocks, a router per task). FLOPs are counted exactly with `torch.utils.flop_counter` (a
multiply-add counts 2) for one forward pass. Step time: forward, backward of the summed losses
(+ MoE balancing), AdamW step; median of repetitions after a warm-up, as a ratio to no adapter
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtl.models.adapters import LoRA, MoE, MTLoRA
from mtl.models.backbone import Backbone
from mtl.models.decoders import HRNetDecoder
from mtl.models.multitask import MultiTaskModel

TASKS = {"semseg": 21, "parts": 7, "sal": 1, "normals": 3}


def build(args: argparse.Namespace, adapter=None) -> MultiTaskModel:
    torch.manual_seed(0)
    name, extra = (
        ("vit_tiny_patch16_224", dict(patch_size=8, depth=4, out_indices=[0, 1, 2, 3]))
        if args.quick
        else ("vit_small_patch16_224", dict(out_indices=[2, 5, 8, 11]))
    )
    backbone = Backbone(name, img_size=tuple(args.size), dynamic_img_size=True, **extra)
    decoder = partial(HRNetDecoder, hidden_channels=32)
    return MultiTaskModel(backbone, decoder, TASKS, adapter)


def adapters() -> dict[str, object]:
    return {
        "none": None,
        "lora": LoRA(rank=8, alpha=16, trainable=["norm"]),
        "mtlora": MTLoRA(trainable=["norm"]),
        "moe": MoE(num_experts=16, top_k=4),
    }


def flops(model: MultiTaskModel, images: torch.Tensor, tasks=None) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, tasks)
    return counter.get_total_flops()


def step_seconds(model: MultiTaskModel, images: torch.Tensor, reps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        preds = model(images)
        loss = sum(p.square().mean() for p in preds.values())
        loss = loss + sum(model.auxiliary_losses().values(), torch.zeros(()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def g(x: float) -> str:
    return f"{x / 1e9:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-Tiny, 4 blocks; < 2 minutes")
    parser.add_argument("--size", type=int, nargs=2, default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    args.size = args.size or ([64, 64] if args.quick else [224, 224])
    reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(max(torch.get_num_threads() // 2, 1))
    images = torch.randn(args.batch_size, 3, *args.size, generator=torch.Generator().manual_seed(0))
    arch = "ViT-Tiny/8, 4 blocks" if args.quick else "ViT-Small/16"
    print(
        f"## Adapters on {arch}, {args.size[0]}x{args.size[1]}, batch {args.batch_size}, "
        f"{len(TASKS)} tasks\n"
    )

    rows = []
    base_time = None
    for name, adapter in adapters().items():
        model = build(args, adapter)
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
        all_flops, one_flops = flops(model, images), flops(model, images, ["semseg"])
        seconds = step_seconds(model, images, reps)
        base_time = base_time or seconds
        rows.append((name, trainable, total, backbone_trainable, all_flops, one_flops, seconds))

    print(
        "| adapter | trainable | total | trainable backbone | GFLOPs all tasks | GFLOPs semseg "
        "only | one / all | step time ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, trainable, total, bb, all_f, one_f, seconds in rows:
        print(
            f"| {name} | {trainable:,} | {total:,} | {bb:,} | {g(all_f)} | {g(one_f)} | "
            f"{one_f / all_f:.2f} | {seconds / base_time:.2f} |"
        )

    print("\n### MoE backbone GFLOPs, one task (semseg), with the number of experts E and top-k\n")
    dense = flops(build(args).backbone, images, None)
    experts = (4, 8, 16) if args.quick else (4, 8, 16, 32)
    print("| E \\ k | " + " | ".join(f"k={k}" for k in (1, 2, 4)) + " |")
    print("|---|" + "---:|" * 3)
    for e in experts:
        cells = []
        for k in (1, 2, 4):
            if k > e:
                cells.append("")
                continue
            model = build(args, MoE(num_experts=e, top_k=k)).eval()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model.backbone(images, ["semseg"])
            cells.append(g(counter.get_total_flops()))
        print(f"| E={e} | " + " | ".join(cells) + " |")
    print(f"\nDense backbone (no adapter): {g(dense)} GFLOPs.")


if __name__ == "__main__":
    main()
