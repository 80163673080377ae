"""Training-step cost of every balancer, as a ratio to equal weighting measured in the same run.

    python -m bench.balancers [--quick] [--batch-size 16] [--size 96 128]

One step = forward, the balancer's backward, optimiser step, on the default model (ResNet-18,
HRNet-style heads, the synthetic dataset's 5 tasks) and a fixed random batch. Each figure is the
median of several repetitions after a warm-up. Bounds: `rep` mode 1.3; `param` mode
1.1 x (1 + 2T)/3 (the T backward passes it needs, a backward costing two forwards); SAM-MTL
1.1 x (1 + 5T)/3 ((1 + T) forwards and 2T backwards). Growth with T uses copies of the depth task
under new names beyond the synthetic dataset's five tasks (registered in this process only).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from bench.table import Table
from bench.timing import median_paired_ratio, median_seconds
from mtl.balancers import available_modes, build_balancer
from mtl.balancers.base import BalanceContext
from mtl.batch_parts import running_stats_set_aside, split_batch
from mtl.models.multitask import Decoded
from mtl.tasks import TASKS, get_task, register
from mtl.train import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"
ALL_TASKS = ["semseg", "depth", "normals", "edge", "sal"]


def methods() -> list[tuple[str, type, str]]:
    """Every balancer config of ``conf/balancer/`` (but equal weighting, the reference) with
    its class and configured mode, loss-weighting methods first: a new method is benchmarked
    without editing this file."""
    found = []
    for path in sorted((CONF / "balancer").glob("*.yaml")):
        node = OmegaConf.load(path)
        if path.stem != "equal" and node.get("_target_"):
            found.append((path.stem, get_class(node._target_), node.get("mode", "param")))
    return sorted(found, key=lambda item: item[1].needs_task_gradients)


@dataclasses.dataclass
class Settings:
    """Batch, input size and timing repetitions of the balancer benchmarks."""

    batch_size: int = 16
    size: tuple[int, int] = (96, 128)
    repeats: int = 5

    @classmethod
    def quick(cls) -> Settings:
        return cls(batch_size=4, size=(64, 64), repeats=2)


def compose_cfg(overrides: list[str]):
    """The training config with ``overrides`` (Hydra composition of ``conf/train.yaml``)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(
            config_name="train", overrides=["paths.root_dir=.", "paths.output_dir=.", *overrides]
        )


def task_names(count: int) -> list[str]:
    """``count`` task names: the synthetic dataset's tasks, then registered copies of depth."""
    names = ALL_TASKS[:count] + [f"depth{i}" for i in range(2, count - len(ALL_TASKS) + 2)]
    for name in names:
        if name not in TASKS:
            register(dataclasses.replace(get_task("depth"), name=name))
    return names


def random_batch(tasks: list[str], batch: int, size: tuple[int, int], classes: int) -> dict:
    """A fixed random batch with a valid target for every task (copies of depth get depth)."""
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
    image = torch.randn(batch, 3, h, w, generator=g)
    return {"image": image, **{t: targets.get(t, targets["depth"]) for t in tasks}}


def make_step(overrides: list[str], tasks: list[str], settings: Settings) -> Callable[[], None]:
    """One training step of a configuration (forward, balancer backward, SGD step) as a call."""
    cfg = compose_cfg(
        [
            f"data.tasks=[{','.join(tasks)}]",
            f"data.image_size=[{settings.size[0]},{settings.size[1]}]",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    balancer = build_balancer(cfg.balancer, cfg.get("flat"), tasks, cfg.get("smoothing"))
    configured = OmegaConf.to_container(cfg.data.loss_weights)
    weights = {t: configured.get(t, get_task(t).loss_weight) for t in tasks}
    optimizer = torch.optim.SGD(list(model.parameters()) + list(balancer.parameters()), lr=1e-4)
    classes = cfg.data.num_classes.semseg
    batch = random_batch(tasks, settings.batch_size, settings.size, classes)
    decoded: list[Decoded] = []
    counter = [0]

    def losses_of(subset=None, rows=None):
        rows = batch if rows is None else rows
        out = model.decode(
            rows["image"],
            subset or tasks,
            detach_features=balancer.uses_representation,
            keep_stem=balancer.uses_stem and rows is batch,
        )
        if rows is batch:
            decoded[:] = [out]
        return {t: weights[t] * get_task(t).loss(out.preds[t], rows[t]) for t in subset or tasks}

    def part_losses(parts: int) -> list[dict]:
        """Losses on independent parts of the batch (MoDo, SDMGrad), as the training step."""
        with running_stats_set_aside(model):
            return [losses_of(rows=part) for part in split_batch(batch, parts)]

    def step() -> None:
        losses = losses_of()
        optimizer.zero_grad(set_to_none=True)
        context = BalanceContext(
            shared_params=model.shared_parameters(),
            task_params=model.task_parameters(),
            backward=lambda t: t.backward(),
            recompute_losses=losses_of,
            part_losses=part_losses,
            all_reduce_mean=lambda t: t,
            step=counter[0],
            features=decoded[0].features,
            head_inputs=decoded[0].head_inputs,
            model=model,
            stem=decoded[0].stem,
            stem_params=model.backbone.stem_parameters() if decoded[0].stem is not None else (),
        )
        balancer.backward(losses, context)
        optimizer.step()
        counter[0] += 1

    return step


def configurations(num_tasks: int) -> list[tuple[str, list[str], float | None]]:
    """(name, config overrides, bound on the ratio to equal weighting) of every method."""
    t = num_tasks
    configs: list[tuple[str, list[str], float | None]] = []
    for name, method, mode in methods():
        if not method.needs_task_gradients:
            configs.append((name, [f"balancer={name}"], None))
            continue
        if mode == "rep":  # a named rep-mode setting (fuller)
            configs.append((f"{name} (rep)", [f"balancer={name}"], 1.3))
            continue
        configs.append((f"{name} (param)", [f"balancer={name}"], 1.1 * (1 + 2 * t) / 3))
        if "rep" in available_modes(method):
            configs.append((f"{name} (rep)", [f"balancer={name}", "balancer.mode=rep"], 1.3))
    configs.append(("equal + sam", ["balancer=equal", "flat=sam"], 1.1 * (1 + 5 * t) / 3))
    configs.append(("pcgrad + asam", ["balancer=pcgrad", "flat=asam"], 1.1 * (1 + 5 * t) / 3))
    return configs


def step_ratio(
    overrides: list[str], reference: Callable[[], None], tasks: list[str], settings: Settings
) -> float:
    """Step time of a configuration over that of ``reference``, timed in alternation."""
    return median_paired_ratio(make_step(overrides, tasks, settings), reference, settings.repeats)


def method_table(settings: Settings, methods: list[str] | None = None) -> Table:
    """Step time of each method (all, or those named in ``methods``, e.g. "pcgrad (rep)").

    Each step of a method is timed right after a step of equal weighting and the ratio is the
    median of those pairs, so that a change of load on the machine does not bias it."""
    equal = make_step(["balancer=equal"], ALL_TASKS, settings)
    base = median_seconds(equal, settings.repeats)
    table = Table(
        "Balancers: training-step time vs equal weighting",
        ["method", "step time / equal", "bound", "within"],
        [["equal", 1.0, "", ""]],
        [
            f"Equal weighting: {base * 1000:.0f} ms/step; ResNet-18 + HRNet heads, "
            f"T={len(ALL_TASKS)}, batch {settings.batch_size}, "
            f"{settings.size[0]}x{settings.size[1]}, {torch.get_num_threads()} threads; "
            f"median over {settings.repeats} pairs (a step of equal weighting, then one of the "
            "method) after one warm-up pair. The bounds assume compute-bound steps; at small "
            "inputs the per-task gradient bookkeeping (flattening, Gramian) dominates and "
            "exceeds them."
        ],
    )
    for name, overrides, bound in configurations(len(ALL_TASKS)):
        if methods and name not in methods:
            continue
        ratio = step_ratio(overrides, equal, ALL_TASKS, settings)
        within = "" if bound is None else ("yes" if ratio <= bound else "NO")
        table.rows.append([name, ratio, "" if bound is None else bound, within])
    return table


def growth_table(settings: Settings, counts: tuple[int, ...] = (2, 3, 5, 8)) -> Table:
    """Ratio to equal weighting (same T) of the T-dependent methods, T = ``counts``."""
    table = Table(
        "Balancers: growth with the number of tasks T (ratio to equal weighting, same T)",
        ["T", "equal (ms)", "pcgrad (param)", "bound", "pcgrad (rep)", "equal + sam", "bound"],
        notes=["Tasks beyond the synthetic five are copies of depth under new names."],
    )
    for count in counts:
        tasks = task_names(count)
        equal = make_step(["balancer=equal"], tasks, settings)
        table.rows.append(
            [
                count,
                median_seconds(equal, settings.repeats) * 1000,
                step_ratio(["balancer=pcgrad"], equal, tasks, settings),
                1.1 * (1 + 2 * count) / 3,
                step_ratio(["balancer=pcgrad", "balancer.mode=rep"], equal, tasks, settings),
                step_ratio(["balancer=equal", "flat=sam"], equal, tasks, settings),
                1.1 * (1 + 5 * count) / 3,
            ]
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch and input")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--size", type=int, nargs=2)
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    settings = Settings.quick() if args.quick else Settings()
    settings.batch_size = args.batch_size or settings.batch_size
    settings.size = tuple(args.size or settings.size)
    settings.repeats = args.repeats or settings.repeats
    print(method_table(settings).markdown())
    print(growth_table(settings).markdown())


if __name__ == "__main__":
    main()
