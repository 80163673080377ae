"""Training-step cost of every balancer, as a ratio to equal weighting measured in the same run.

    python bench/balancers.py [--quick] [--batch-size 16] [--size 96 128]

One step = forward, the balancer's backward, optimiser step, on the default model (ResNet-18,
HRNet-style heads, the synthetic dataset's 5 tasks) and a fixed random batch. Each figure is the
median of several repetitions after a warm-up. Bounds: `rep` mode 1.3; `param` mode
1.1 x (1 + 2T)/3 (the T backward passes it needs, a backward costing two forwards); SAM-MTL
1.1 x (1 + 5T)/3 ((1 + T) forwards and 2T backwards). Peak memory is the process's peak resident
set during the step (Linux), in MiB above the equal-weighting step's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtl.balancers import build_balancer
from mtl.balancers.base import BalanceContext
from mtl.tasks import get_task
from mtl.train import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"
ALL_TASKS = ["semseg", "depth", "normals", "edge", "sal"]
GRADIENT_METHODS = ["pcgrad", "cagrad", "mgda", "imtl", "nash", "aligned", "upgrad"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(
            config_name="train", overrides=["paths.root_dir=.", "paths.output_dir=.", *overrides]
        )


def random_batch(tasks: list[str], batch: int, size: tuple[int, int], classes: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = size
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, h, w, generator=g), dim=1)
    targets = {
        "semseg": torch.randint(classes, (batch, h, w), generator=g),
        "depth": torch.rand(batch, 1, h, w, generator=g) * 5 + 0.5,
        "normals": normals,
        "edge": (torch.rand(batch, 1, h, w, generator=g) > 0.9).float(),
        "sal": (torch.rand(batch, 1, h, w, generator=g) > 0.7).float(),
    }
    return {"image": torch.randn(batch, 3, h, w, generator=g), **{t: targets[t] for t in tasks}}


def peak_rss_mib() -> float:
    """Peak resident set of this process (Linux VmHWM), MiB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # Linux: reset the peak resident set
        Path("/proc/self/clear_refs").write_text("5")


def time_step(overrides: list[str], tasks: list[str], args) -> tuple[float, float]:
    """Median step time (s) and peak RSS (MiB) of one configuration."""
    cfg = compose_cfg(
        [
            f"data.tasks=[{','.join(tasks)}]",
            f"data.image_size=[{args.size[0]},{args.size[1]}]",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    balancer = build_balancer(cfg.balancer, cfg.get("flat"), tasks)
    weights = OmegaConf.to_container(cfg.data.loss_weights)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(balancer.parameters()), lr=1e-4)
    batch = random_batch(tasks, args.batch_size, tuple(args.size), cfg.data.num_classes.semseg)
    features: list[torch.Tensor] = []

    def losses_of(subset=None):
        preds, feats = model(batch["image"], subset or tasks, return_features=True)
        features[:] = feats
        return {t: weights[t] * get_task(t).loss(preds[t], batch[t]) for t in subset or tasks}

    def step(index: int) -> None:
        losses = losses_of()
        optimizer.zero_grad(set_to_none=True)
        context = BalanceContext(
            shared_params=model.shared_parameters(),
            task_params=model.task_parameters(),
            backward=lambda t: t.backward(),
            recompute_losses=losses_of,
            all_reduce_mean=lambda t: t,
            step=index,
            features=list(features),
            model=model,
        )
        balancer.backward(losses, context)
        optimizer.step()

    step(0)  # warm-up
    reset_peak_rss()
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and methods")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 2
    torch.set_num_threads(torch.get_num_threads())

    base_time, base_mem = time_step(["balancer=equal"], ALL_TASKS, args)
    t = len(ALL_TASKS)
    configs = [(m, [f"balancer={m}"], None) for m in ["uncertainty", "dwa", "rlw", "famo"]]
    methods = ["pcgrad", "mgda"] if args.quick else GRADIENT_METHODS
    for m in methods:
        configs.append((f"{m} (param)", [f"balancer={m}"], 1.1 * (1 + 2 * t) / 3))
        configs.append((f"{m} (rep)", [f"balancer={m}", "balancer.mode=rep"], 1.3))
    configs.append(("equal + sam", ["balancer=equal", "flat=sam"], 1.1 * (1 + 5 * t) / 3))
    configs.append(("pcgrad + asam", ["balancer=pcgrad", "flat=asam"], 1.1 * (1 + 5 * t) / 3))
    print(
        f"equal weighting: {base_time * 1000:.0f} ms/step, T={t}, batch {args.batch_size}, "
        f"{args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads\n"
    )
    print("| method | step time / equal | bound | within | peak memory over equal (MiB) |")
    print("|---|---|---|---|---|")
    print("| equal | 1.00 | | | 0 |")
    for name, overrides, bound in configs:
        seconds, memory = time_step(overrides, ALL_TASKS, args)
        ratio = seconds / base_time
        within = "" if bound is None else ("yes" if ratio <= bound else "NO")
        bound_text = "" if bound is None else f"{bound:.2f}"
        print(
            f"| {name} | {ratio:.2f} | {bound_text} | {within} | {memory - base_mem:.0f} |",
            flush=True,
        )

    print("\nGrowth with the number of tasks T (ratio to equal weighting with the same T):\n")
    print("| T | pcgrad (param) | bound | pcgrad (rep) | equal + sam | bound |")
    print("|---|---|---|---|---|---|")
    for count in (2, 3, 5):
        tasks = ALL_TASKS[:count]
        equal, _ = time_step(["balancer=equal"], tasks, args)
        param, _ = time_step(["balancer=pcgrad"], tasks, args)
        rep, _ = time_step(["balancer=pcgrad", "balancer.mode=rep"], tasks, args)
        sam, _ = time_step(["balancer=equal", "flat=sam"], tasks, args)
        print(
            f"| {count} | {param / equal:.2f} | {1.1 * (1 + 2 * count) / 3:.2f} | "
            f"{rep / equal:.2f} | {sam / equal:.2f} | {1.1 * (1 + 5 * count) / 3:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
