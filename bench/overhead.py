"""Framework overhead: one training step of the LightningModule, driven by a Lightning Trainer,
against a plain PyTorch loop on the same model, batch and optimiser.

    python -m bench.overhead [--quick]

Model and data: the default configuration (ResNet-18, HRNet-style heads, the synthetic dataset's
five tasks at its training size and batch), equal weighting, the configured AdamW, learning-rate
schedule and gradient clipping, one fixed random batch. The plain loop runs forward, the sum of
the weighted task losses, backward, gradient clipping, AdamW step and schedule step. The Trainer
runs ``train.py``'s module with the configured callbacks and loggers (files in a temporary
directory; no progress bar, no validation); a step is the time between the starts of consecutive
training batches, so it includes everything Lightning does between two steps. Figures: median
over the timed steps after warm-up steps; rows other than the first are ratios to the plain loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from bench.balancers import ALL_TASKS, compose_cfg, random_batch
from bench.table import Table
from bench.timing import median_interval, median_seconds
from mtl.train import build_callbacks, build_module


@dataclass
class Settings:
    """Timed and warm-up steps; batch and size default to the synthetic dataset's config."""

    steps: int = 20
    warmup: int = 3
    rounds: int = 3
    batch_size: int | None = None
    size: tuple[int, int] | None = None

    @classmethod
    def quick(cls) -> Settings:
        return cls(steps=6, warmup=2, rounds=2, batch_size=4)


class StepTimer(L.Callback):
    """Time stamps of the start of every training batch (and of the end of the last)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.stamps.append(time.perf_counter())


def _config(settings: Settings, overrides: list[str], output_dir: str):
    extra = [f"paths.output_dir={output_dir}", "balancer=equal"]
    if settings.batch_size:
        extra.append(f"data.batch_size={settings.batch_size}")
    if settings.size:
        extra.append(f"data.image_size=[{settings.size[0]},{settings.size[1]}]")
    cfg = compose_cfg([*extra, *overrides])
    batch = random_batch(
        list(cfg.data.tasks), cfg.data.batch_size, tuple(cfg.data.image_size),
        cfg.data.num_classes.semseg,
    )  # fmt: skip
    return cfg, batch


def plain_step_seconds(settings: Settings) -> float:
    """Median step time of the plain PyTorch loop on the configured model and optimiser."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, batch = _config(settings, [], tmp)
        torch.manual_seed(0)
        module = build_module(cfg)
    model, weights = module.model, module.loss_weights
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optim.optimizer)(params=params)
    total = settings.warmup + settings.steps
    scheduler = (
        instantiate(cfg.optim.scheduler)(optimizer, total_steps=total)
        if cfg.optim.get("scheduler")
        else None
    )
    clip = cfg.optim.get("grad_clip_norm")

    def step() -> None:
        preds = model(batch["image"])
        loss = sum(weights[t] * loss for t, loss in module.task_losses(preds, batch).items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    return median_seconds(step, settings.steps, warmup=settings.warmup)


def lightning_step_seconds(
    settings: Settings,
    overrides: list[str] = (),
    bare: bool = False,
    patch: Callable[[L.LightningModule], None] | None = None,
) -> float:
    """Median step time of ``train.py``'s module under a Trainer (``bare``: no callbacks, no
    loggers); ``patch`` may alter the module before fitting."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, batch = _config(settings, list(overrides), tmp)
        torch.manual_seed(0)
        module = build_module(cfg)
        if patch is not None:
            patch(module)
        total = settings.warmup + settings.steps
        callbacks = [] if bare else build_callbacks(cfg)
        loggers = [] if bare else [instantiate(c) for c in (cfg.get("logger") or {}).values()]
        trainer = instantiate(
            cfg.trainer,
            callbacks=[*callbacks, timer],
            logger=loggers or False,
            max_steps=total,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=not bare,
        )
        loader = DataLoader([batch] * total, batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    return median_interval(timer.stamps, skip=settings.warmup)


def _no_logging(module: L.LightningModule) -> None:
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None


def overhead_table(settings: Settings) -> Table:
    """Lightning step time as a ratio to the plain loop, with variants that locate the cost.

    The loops run in turn, ``settings.rounds`` times (the diagnostics variant once); each keeps
    its fastest median, so that a burst of load on the machine during one of them does not
    decide the ratio."""
    variants: list[tuple[str, Callable[[], float]]] = [
        ("plain PyTorch loop", lambda: plain_step_seconds(settings)),
        (
            "Lightning, as configured (callbacks, CSV logger)",
            lambda: lightning_step_seconds(settings),
        ),
        (
            "Lightning, self.log / log_dict disabled",
            lambda: lightning_step_seconds(settings, patch=_no_logging),
        ),
        (
            "Lightning, no callbacks, no logger",
            lambda: lightning_step_seconds(settings, bare=True),
        ),
        (
            "Lightning, gradient-conflict diagnostics every step",
            lambda: lightning_step_seconds(settings, ["diagnostics_every_n_steps=1"]),
        ),
    ]
    best = {name: float("inf") for name, _ in variants}
    for round_ in range(settings.rounds):
        for name, measure in variants:
            if round_ == 0 or "diagnostics" not in name:  # the slow one: measured once
                best[name] = min(best[name], measure())
    plain = best["plain PyTorch loop"]
    return Table(
        "Framework overhead: one training step, Lightning module vs plain PyTorch",
        ["loop", "ms / step", "ratio to plain"],
        [[name, seconds * 1000, seconds / plain] for name, seconds in best.items()],
        [
            f"Default model and synthetic data ({len(ALL_TASKS)} tasks), equal weighting, AdamW "
            f"+ schedule + clipping in both; median of {settings.steps} steps after "
            f"{settings.warmup}, best of {settings.rounds} interleaved rounds (diagnostics: "
            "one); target: as configured <= 1.05. Diagnostics run every "
            "diagnostics_every_n_steps steps "
            "(amortised cost: (last ratio - 1) / that number)."
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    print(overhead_table(Settings.quick() if args.quick else Settings()).markdown())


if __name__ == "__main__":
    main()
