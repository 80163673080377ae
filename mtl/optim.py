"""Learning-rate schedules stepped once per optimiser step.

Schedulers in configs are Hydra partials called as ``scheduler(optimizer, total_steps=N)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, LRScheduler, PolynomialLR, SequentialLR


def warmup_poly(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, power: float = 0.9
) -> LRScheduler:
    """Linear warm-up from 1% of the base rate, then polynomial decay to zero at `total_steps`
    (the "poly" schedule of dense-prediction work)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = max(int(warmup_steps), 0)
    if warmup_steps == 0:
        return PolynomialLR(optimizer, total_iters=total_steps, power=power)
    # the warm-up ends before the run; a one-step run keeps both schedulers (its warm-up flat,
    # its one step at the base rate) so that a longer resumed run loads its scheduler state
    warmup_steps = min(warmup_steps, total_steps - 1)
    start = 0.01 if warmup_steps else 1.0
    warmup_steps = max(warmup_steps, 1)
    decay = PolynomialLR(optimizer, total_iters=max(total_steps - warmup_steps, 1), power=power)
    warmup = LinearLR(optimizer, start_factor=start, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])


def rebuild_schedule(
    factory: Callable[..., LRScheduler], scheduler: LRScheduler, total_steps: int
) -> LRScheduler:
    """The schedule `factory` builds for `total_steps` on `scheduler`'s optimiser, advanced to
    the step `scheduler` has reached: what an uninterrupted run of the new length would use.

    For a resumed run whose length changed (a larger ``trainer.max_epochs``): the restored
    scheduler keeps the old length, and a poly schedule past its end runs at rate 0. The new
    one is stepped from the start (not set by formula) so that any scheduler a config names
    gives the values of a fresh run, bit for bit.
    """
    optimizer = scheduler.optimizer
    for group in optimizer.param_groups:  # chainable schedulers start from the current rate
        group["lr"] = group["initial_lr"]
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
        warnings.simplefilter("ignore", UserWarning)
        rebuilt = factory(optimizer, total_steps=total_steps)
        for _ in range(scheduler.last_epoch):
            rebuilt.step()
    return rebuilt
