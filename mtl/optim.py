"""Learning-rate schedules stepped once per optimiser step.

Schedulers in configs are Hydra partials called as ``scheduler(optimizer, total_steps=N)``.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, LRScheduler, PolynomialLR, SequentialLR


def warmup_poly(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, power: float = 0.9
) -> LRScheduler:
    """Linear warm-up from 1% of the base rate, then polynomial decay to zero at `total_steps`
    (the "poly" schedule of dense-prediction work)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    decay = PolynomialLR(optimizer, total_iters=total_steps - warmup_steps, power=power)
    if warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
