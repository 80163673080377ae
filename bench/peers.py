"""mtl's exact gradient methods next to TorchJD's, on the same model and batch.

    python -m bench.peers [--tiny] [--model vit_tiny|resnet18] [--rounds 5]

One interleaved run: every round times one step of each entry in turn (a plain sum-of-losses
step first), and each entry's figure is the median over rounds of its time over the plain step's
in the same round. Peak memory is the resident-set growth of one step after a warm-up (see
`bench.memory`), as a ratio to the plain step's. Every entry aggregates with UPGrad:

- mtl ``param`` stored: T backward passes into the T x P Jacobian, weights from its Gramian;
- mtl ``param`` streamed: one batched backward adds each parameter's rows to the Gramian and
  frees them, then one backward of Σ w_i L_i;
- mtl ``rep``: the Gramian of the gradients with respect to the shared features;
- TorchJD autojac: ``mtl_backward`` (Jacobian of the shared parameters through the features,
  heads' own gradients) then ``jac_to_grad(shared, UPGrad())``;
- TorchJD autogram: ``Engine(backbone).compute_gramian(losses)``, ``UPGradWeighting``, then
  ``losses.backward(weights)`` (its heads get weighted gradients; the cost is the same).

TorchJD is an optional extra (``pip install -e ".[dev]"`` installs it); without it the TorchJD
rows are left out with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from bench import balancers
from bench.memory import step_growth_mib
from bench.table import Table
from bench.timing import exact_rss_accounting
from mtl.tasks import get_task
from mtl.train import build_model

#: Config overrides of the benchmark models.
MODELS = {
    "vit_tiny": ["model/backbone=vit_tiny"],
    "resnet18": ["model/backbone=resnet18"],
    # the test's: ViT-Tiny with 4 blocks, patches of 8, narrow heads
    "vit_tiny_4": [
        "model/backbone=vit_tiny",
        "+model.backbone.depth=4",
        "+model.backbone.patch_size=8",
        "model.backbone.out_indices=[1,3]",
        "model.decoder.hidden_channels=8",
    ],
}


@dataclasses.dataclass
class Settings:
    """Model, batch, input size and rounds of the comparison."""

    model: str = "vit_tiny"
    batch_size: int = 8
    size: tuple[int, int] = (128, 128)
    rounds: int = 5

    @classmethod
    def tiny(cls) -> Settings:
        """Seconds on a CPU (the test's settings): the figures only show that every entry runs."""
        return cls(model="vit_tiny_4", batch_size=2, size=(32, 32), rounds=1)

    def steps(self) -> balancers.Settings:
        return balancers.Settings(batch_size=self.batch_size, size=self.size, repeats=1)


def _model_and_losses(settings: Settings):
    """The default-config model of `settings` and a call returning (features, losses)."""
    tasks = balancers.ALL_TASKS
    cfg = balancers.compose_cfg(
        [
            f"data.tasks=[{','.join(tasks)}]",
            f"data.image_size=[{settings.size[0]},{settings.size[1]}]",
            *MODELS[settings.model],
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = balancers.random_batch(
        tasks, settings.batch_size, settings.size, cfg.data.num_classes.semseg
    )
    weights = {t: cfg.data.loss_weights.get(t, get_task(t).loss_weight) for t in tasks}

    def losses():
        out = model.decode(batch["image"], tasks)
        return out.features, [weights[t] * get_task(t).loss(out.preds[t], batch[t]) for t in tasks]

    return model, losses


def plain_step(settings: Settings) -> Callable[[], None]:
    """Forward, sum of the task losses, backward, SGD step."""
    model, losses = _model_and_losses(settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(losses()[1]).backward()
        optimizer.step()

    return step


def autojac_step(settings: Settings) -> Callable[[], None]:
    """TorchJD autojac: the Jacobian of the shared parameters, aggregated by UPGrad."""
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    model, losses = _model_and_losses(settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    shared, heads = model.shared_parameters(), list(model.task_parameters().values())
    aggregator = UPGrad()
    # A CNN's feature levels are successive stages: the backward from all of them crosses
    # each stage more than once, which needs the graph kept (a ViT's levels do not).
    chained = not settings.model.startswith("vit")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features, values = losses()
        mtl_backward(
            values, features, tasks_params=heads, shared_params=shared, retain_graph=chained
        )
        jac_to_grad(shared, aggregator)
        optimizer.step()

    return step


def autogram_step(settings: Settings) -> Callable[[], None]:
    """TorchJD autogram: the Gramian of the shared parameters' Jacobian (never the Jacobian),
    UPGrad's weights, one weighted backward."""
    from torchjd.aggregation import UPGradWeighting
    from torchjd.autogram import Engine

    model, losses = _model_and_losses(settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    # batch_dim=None: BatchNorm is allowed
    engine = Engine(*_called_modules(model.backbone, losses), batch_dim=None)
    weighting = UPGradWeighting()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        values = torch.stack(losses()[1])
        weights = weighting(engine.compute_gramian(values))
        values.backward(weights)
        optimizer.step()

    return step


def _called_modules(root: torch.nn.Module, forward: Callable[[], object]) -> list:
    """The largest submodules of `root` with parameters of their own that the forward pass
    calls. Autogram sees a module's parameters through its forward hook; a ViT backbone calls
    ``forward_intermediates`` of the timm model, not the model itself, so its blocks are taken
    and the few parameters the model holds directly (position embedding, class token) are left
    out of autogram's Gramian."""
    called: set[int] = set()
    hooks = [
        m.register_forward_hook(lambda module, *_: called.add(id(module))) for m in root.modules()
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()

    def pick(module: torch.nn.Module) -> list[torch.nn.Module]:
        direct = any(p.requires_grad for p in module.parameters(recurse=False))
        if direct and id(module) in called:
            return [module]  # autogram takes all of it through this module's hook
        return [m for child in module.children() for m in pick(child)]

    return pick(root)


def entries(settings: Settings) -> tuple[dict[str, Callable[[], None]], list[str]]:
    """The steps to compare, by name (plain first), and notes on what was left out."""
    model = MODELS[settings.model]

    def mtl(*overrides: str) -> Callable[[], None]:
        steps = settings.steps()
        return balancers.make_step(
            ["balancer=upgrad", *overrides, *model], balancers.ALL_TASKS, steps
        )

    steps = {
        "plain sum of losses": plain_step(settings),
        "mtl param stored": mtl("balancer.jacobian=stored"),
        "mtl param streamed": mtl("balancer.jacobian=streamed"),
        "mtl rep": mtl("balancer.mode=rep"),
    }
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return steps, ["TorchJD is not installed (pip install -e '.[dev]'): its rows are left out."]
    steps["TorchJD autojac"] = autojac_step(settings)
    steps["TorchJD autogram"] = autogram_step(settings)
    return steps, []


def peers_table(settings: Settings) -> Table:
    """Step time and peak memory of every entry as ratios to the plain step, one run."""
    exact_rss_accounting()
    steps, notes = entries(settings)
    memory = {name: step_growth_mib(step) for name, step in steps.items()}  # warm-up included
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    plain_times = []
    for _ in range(settings.rounds):
        times = {}
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name] = time.perf_counter() - start
        plain = times["plain sum of losses"]
        plain_times.append(plain)
        for name, seconds in times.items():
            ratios[name].append(seconds / plain)
    base = memory["plain sum of losses"]
    rows = [
        [name, statistics.median(ratios[name]), memory[name], memory[name] / base] for name in steps
    ]
    return Table(
        f"Peers: UPGrad through mtl and TorchJD ({settings.model}, T={len(balancers.ALL_TASKS)}, "
        f"batch {settings.batch_size}, {settings.size[0]}x{settings.size[1]})",
        ["entry", "step time / plain", "peak over step start (MiB)", "memory / plain"],
        rows,
        [
            f"Plain step: {statistics.median(plain_times) * 1000:.0f} ms; median over "
            f"{settings.rounds} interleaved rounds, {torch.get_num_threads()} thread(s), torch "
            f"{torch.__version__}{_torchjd_version()}. Memory: resident-set growth during one "
            "step after a warm-up. TorchJD autogram hooks the backbone's submodules that the "
            "forward calls: a ViT's position embedding and class token stay out of its Gramian.",
            *notes,
        ],
    )


def _torchjd_version() -> str:
    try:
        from importlib.metadata import version

        return f", TorchJD {version('torchjd')}"
    except Exception:  # not installed
        return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: 32x32, batch 2, 1 round")
    parser.add_argument(
        "--model", choices=sorted(MODELS), help="default vit_tiny (--tiny: vit_tiny_4)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings.tiny() if args.tiny else Settings()
    settings.model = args.model or settings.model
    if args.rounds:
        settings.rounds = args.rounds
    print(peers_table(settings).markdown())


if __name__ == "__main__":
    main()
