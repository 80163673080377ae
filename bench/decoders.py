"""Cost of the decoders: parameters, FLOPs (all tasks and one), training-step time, peak memory.

    python -m bench.decoders [--small] [--size H W] [--repeats N] [--no-steps] [--archs A ...]

Model: a random ViT-S/16 and ViT-B/16 at 448x576, batch 1 (``--small``: ViT-Tiny/8 with 4
blocks at 32x48, seconds), the four NYUD-v2 heads, CPU. Decoders: every
``conf/model/decoder/*.yaml`` (new ones appear by themselves), with their defaults; where an
experiment ``conf/experiment/{nyud,pascal}_<vit>_<decoder>.yaml`` exists, with its decoder
values (MLoRE's published setting for that backbone). FLOPs: `torch.utils.flop_counter`, one
forward pass (a multiply-add counts 2), counted on the meta device (shapes only). Step: forward,
backward of a square loss per head plus the decoder's auxiliary losses, AdamW; median after a
warm-up. Memory: peak resident-set growth of one step (`bench.memory`; NaN off Linux).
``--no-steps``: parameters and FLOPs only (seconds at any size).

MLoRE's parameter count follows from the dimensions of the authors' release alone
(`mlore_parameter_count`); the table's note states it at ViT-L next to the built module's count.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bench.memory import step_growth_mib
from bench.models import NYUD_HEADS, PASCAL_HEADS, VITS, forward_flops, train_step
from bench.table import Table
from bench.timing import exact_rss_accounting, median_seconds
from mtl.models.backbone import Backbone
from mtl.models.multitask import MultiTaskModel

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Settings:
    """Backbones, input size, batch and timing repetitions of the decoder benchmark."""

    archs: tuple[str, ...] = ("vit_small", "vit_base")
    size: tuple[int, int] = (448, 576)
    batch_size: int = 1
    repeats: int = 3
    steps: bool = True  # False: parameters and FLOPs only
    meta: bool = True  # count FLOPs on the meta device (no memory; slower than tiny real runs)

    @classmethod
    def small(cls) -> Settings:
        return cls(archs=("vit_tiny_4",), size=(32, 48), repeats=1, meta=False)


def decoder_names() -> list[str]:
    """Every decoder config, ``conf/model/decoder/<name>.yaml``."""
    return sorted(p.stem for p in (CONF / "model" / "decoder").glob("*.yaml"))


def decoder_factory(name: str, arch: str, size: Sequence[int]):
    """The configured decoder (a class or a partial), with an experiment's values for `arch`
    where one exists; small settings (ViT-Tiny) shrink MLoRE's experts to stay in seconds."""
    overrides = [f"model/decoder={name}", f"data.image_size=[{size[0]},{size[1]}]"]
    for dataset in ("nyud", "pascal"):
        if (CONF / "experiment" / f"{dataset}_{arch}_{name}.yaml").exists():
            overrides.append(f"experiment={dataset}_{arch}_{name}")
            break
    overrides.append(f"data.image_size=[{size[0]},{size[1]}]")  # after the experiment's
    if arch == "vit_tiny_4" and name == "mlore":
        overrides += ["model.decoder.embed_dim=32", "model.decoder.rank_list=[2,4,6,8]",
                      "model.decoder.topk=2", "model.decoder.spe_rank=4"]  # fmt: skip
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=overrides)
    return instantiate(cfg.model.decoder, _convert_="all")


def model(name: str, arch: str, size: Sequence[int], factory=None) -> MultiTaskModel:
    """A random ViT (a key of `VITS`) with decoder `name` (or its composed `factory`)."""
    torch.manual_seed(0)
    timm_name, extra = VITS[arch]
    backbone = Backbone(timm_name, img_size=tuple(size), dynamic_img_size=True, **extra)
    factory = factory or decoder_factory(name, arch, size)
    return MultiTaskModel(backbone, factory, dict(NYUD_HEADS))


def cost_table(settings: Settings) -> Table:
    """Per backbone and decoder: decoder parameters, FLOPs, step time and peak step memory."""
    exact_rss_accounting()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(settings.batch_size, 3, *settings.size, generator=g)
    h, w = settings.size
    table = Table(
        f"Decoders: parameters, FLOPs, step time, memory ({h}x{w}, batch {settings.batch_size}, "
        "NYUD-v2 heads)",
        ["backbone", "decoder", "decoder params", "GFLOPs all tasks", "GFLOPs semseg only",
         "step s", "step peak MiB"],  # fmt: skip
        notes=[
            "GFLOPs of the whole model (backbone included); one forward pass. Step: forward, "
            f"backward, AdamW, median of {settings.repeats}. Peak: resident-set growth of a step.",
            mlore_vit_large_note(),
        ],
    )
    for arch in settings.archs:
        for name in decoder_names():
            factory = decoder_factory(name, arch, settings.size)
            with torch.device("meta" if settings.meta else "cpu"):  # meta: shapes only
                net = model(name, arch, settings.size, factory)
                shapes = torch.empty(images.shape) if settings.meta else images
            params = sum(p.numel() for p in net.decoders.parameters())
            every = forward_flops(net, shapes)
            one = forward_flops(net, shapes, ["semseg"])
            seconds = memory = float("nan")
            if settings.steps:
                real = model(name, arch, settings.size, factory) if settings.meta else net
                step = train_step(real, images)
                seconds = median_seconds(step, settings.repeats)
                memory = step_growth_mib(step)
            table.rows.append([arch, name, params, every / 1e9, one / 1e9, seconds, memory])
    return table


# --------------------------------------------------------------------------- MLoRE's size
def mlore_parameter_count(
    in_channels: Sequence[int],
    task_channels: Mapping[str, int],
    tokens: int,
    embed_dim: int,
    rank_list: Sequence[int],
    spe_rank: int,
) -> int:
    """MLoRE's parameter count from its dimensions (the authors' layout), by hand.

    D = embed_dim, E experts of ranks r_i (R = sum), s = spe_rank, q = D // 4, N tokens,
    L levels of C_l channels, T tasks of K_t output channels:

    - level fusion (1x1 conv): C_l D + D per level;
    - per MoE block (2 per level), shared: experts sum_i (9 D r_i + r_i) + (r_i D + D)
      = 10 D R + R + E D; the shared 3x3 conv 9 D^2 + D;
    - per MoE block and task: conv1 and conv3 2 (D^2 + D); the task low-rank path
      10 D s + s + D; two BatchNorms 4 D; router: channel branch (D q + q) + 2 q + (q^2 + q),
      spatial branch (N + 1) + 2 D + (D q + q), logits 2 q (2E + 1) + (2E + 1);
    - per task: level mask L D D + D, BN 2 D, 3x3 conv 9 D L + L; head 3x3 conv 9 D^2 + D,
      BN 2 D, 1x1 conv D K_t + K_t.

    PASCAL-Context ViT-L (C_l = 1024, L = 4, D = 452, ranks 16..128 step 8 so R = 1080, E = 15,
    s = 72, q = 113, N = 32 x 32 = 1024; tasks semseg 21, parts 7, sal 1, normals 3, edge 1):
    fusion 4 x 463,300 = 1,853,200. Block shared: 4,881,600 + 1,080 + 6,780 + 1,839,188 =
    6,728,648. Block per task: 409,512 + 325,964 + 1,808 + router (51,189 + 226 + 12,882 +
    1,025 + 904 + 51,189 + 7,037 = 124,452) = 861,736, x 5 tasks = 4,308,680. Eight blocks:
    8 x 11,037,328 = 88,298,624. Masks: 5 x (817,668 + 904 + 16,276) = 4,174,240. Heads:
    5 x (1,839,188 + 904) + 452 x 33 + 33 = 9,215,409. Total 103,541,473
    (``MLORE_PASCAL_VIT_LARGE``).
    """
    d, q, e = embed_dim, embed_dim // 4, len(rank_list)
    ranks, s, levels = sum(rank_list), spe_rank, len(in_channels)
    fusion = sum(c * d + d for c in in_channels)
    block_shared = 10 * d * ranks + ranks + e * d + 9 * d * d + d
    router = (d * q + q) + 2 * q + (q * q + q) + (tokens + 1) + 2 * d + (d * q + q)
    router += 2 * q * (2 * e + 1) + (2 * e + 1)
    block_task = 2 * (d * d + d) + (10 * d * s + s + d) + 4 * d + router
    blocks = 2 * levels * (block_shared + len(task_channels) * block_task)
    mask = levels * d * d + d + 2 * d + 9 * d * levels + levels
    heads = sum(9 * d * d + d + 2 * d + d * k + k for k in task_channels.values())
    return fusion + blocks + len(task_channels) * mask + heads


#: `mlore_parameter_count` at the PASCAL-Context ViT-L setting (worked out in its docstring).
MLORE_PASCAL_VIT_LARGE = 103_541_473
PASCAL_TASKS = {**PASCAL_HEADS, "edge": 1}
PASCAL_VIT_LARGE = dict(
    in_channels=[1024] * 4, task_channels=PASCAL_TASKS, tokens=32 * 32, embed_dim=452,
    rank_list=list(range(16, 129, 8)), spe_rank=72,
)  # fmt: skip


def built_mlore_parameters(
    in_channels: Sequence[int],
    task_channels: Mapping[str, int],
    tokens: int,
    embed_dim: int,
    rank_list: Sequence[int],
    spe_rank: int,
) -> int:
    """Parameters of the `MLoRE` module built (on the meta device: no memory) at these sizes,
    with a square token grid of `tokens` positions at stride 16."""
    from mtl.models.decoders import MLoRE

    side = round(tokens**0.5) * 16
    with torch.device("meta"):
        decoder = MLoRE(in_channels, [16] * len(in_channels), task_channels, (side, side),
                        embed_dim, rank_list, spe_rank)  # fmt: skip
    return sum(p.numel() for p in decoder.parameters())


def mlore_vit_large_note() -> str:
    implied = mlore_parameter_count(**PASCAL_VIT_LARGE)
    built = built_mlore_parameters(**PASCAL_VIT_LARGE)
    return (
        f"MLoRE at ViT-L (PASCAL-Context setting, 512x512, 5 tasks): {implied:,} parameters "
        f"implied by the authors' dimensions; the module built here has {built:,}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="ViT-Tiny/8, 32x48: seconds")
    parser.add_argument("--size", type=int, nargs=2)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-steps", action="store_true", help="parameters and FLOPs only")
    parser.add_argument("--archs", nargs="+", choices=sorted(VITS), help="backbones to measure")
    args = parser.parse_args()
    settings = Settings.small() if args.small else Settings()
    settings.steps = not args.no_steps
    settings.archs = tuple(args.archs or settings.archs)
    settings.size = tuple(args.size or settings.size)
    settings.repeats = args.repeats or settings.repeats
    print(cost_table(settings).markdown())


if __name__ == "__main__":
    main()
