"""GPU throughput of ViT-S and ViT-B at the NYUD-v2 training size in bf16, and the achieved
share of the GPU's peak dense bf16 matrix throughput.

    python -m bench.gpu [--quick]

Models: random-init ViT-S/16 and ViT-B/16 with the NYUD-v2 heads (HRNet-style, 64 channels),
448x576, bf16 autocast. Training step: forward, backward, AdamW; inference: forward without
gradients. FLOPs are counted by `torch.utils.flop_counter` on the same call (matrix products,
convolutions, attention; backward included for the training step); share = FLOPs / time / peak.
Skipped (one note row) without CUDA; the share is left empty for a GPU not in `PEAK_BF16_TFLOPS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.models import NYUD_HEADS, count_flops, train_step, vit_model
from bench.table import Table
from bench.timing import median_seconds

#: Peak dense bf16 tensor-core TFLOP/s (no sparsity) by a substring of the device name; the
#: first match wins, so more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by name; None when unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


@dataclass
class Settings:
    """Input size, batch sizes and timing repetitions of the GPU benchmark."""

    size: tuple[int, int] = (448, 576)
    train_batch: int = 16
    infer_batch: int = 32
    repeats: int = 20
    warmup: int = 5
    archs: tuple[str, ...] = ("vit_small", "vit_base")

    @classmethod
    def quick(cls) -> Settings:
        return cls(repeats=10, warmup=3)


def _synced(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        fn()
        torch.cuda.synchronize()

    return call


def _inference(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def call() -> None:
        with torch.no_grad():
            model(images)

    return call


def gpu_table(settings: Settings) -> Table:
    """Images/s, TFLOP/s and share of peak for training and inference of each ViT."""
    header = ["model", "mode", "batch", "images/s", "GFLOPs / image", "TFLOP/s", "share of peak"]
    if not torch.cuda.is_available():
        return Table(
            "GPU: ViT throughput in bf16",
            header,
            notes=["Skipped: no CUDA device on this machine."],
        )
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    table = Table(
        f"GPU: ViT throughput in bf16, {settings.size[0]}x{settings.size[1]} ({name})",
        [*header, "peak memory (GiB)"],
        notes=[
            f"Peak dense bf16: {peak or 'unknown'} TFLOP/s; median of {settings.repeats} after "
            f"{settings.warmup} warm-up calls; NYUD-v2 heads; torch {torch.__version__}."
        ],
    )
    for arch in settings.archs:
        model = vit_model(arch, settings.size, NYUD_HEADS, hidden_channels=64).cuda()
        g = torch.Generator().manual_seed(0)
        for mode, batch in (("train", settings.train_batch), ("inference", settings.infer_batch)):
            images = torch.randn(batch, 3, *settings.size, generator=g).cuda()
            fn = train_step(model, images) if mode == "train" else _inference(model, images)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                flops = count_flops(fn)
                torch.cuda.reset_peak_memory_stats()
                seconds = median_seconds(_synced(fn), settings.repeats, settings.warmup)
            achieved = flops / seconds / 1e12
            table.rows.append(
                [
                    arch.replace("vit_small", "ViT-S/16").replace("vit_base", "ViT-B/16"),
                    mode,
                    batch,
                    batch / seconds,
                    flops / batch / 1e9,
                    achieved,
                    "" if peak is None else achieved / peak,
                    torch.cuda.max_memory_allocated() / 2**30,
                ]
            )
        model = None
        torch.cuda.empty_cache()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    print(gpu_table(Settings.quick() if args.quick else Settings()).markdown())


if __name__ == "__main__":
    main()
