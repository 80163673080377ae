"""The width configuration for a compute budget and a task preference (exact, by enumeration).

Rules:
- cost: counted FLOPs (`mtl.slim.cost.CostTable`) at most ``budget`` x those of the full model;
- preference order: a task with a higher preference never gets a narrower decoder than a task
  with a lower one, and tasks of equal preference get equal widths;
- objective: among the configurations that satisfy both, the one of highest preference-weighted
  capacity ``w_encoder + sum_t p_t * w_t`` (p normalised to sum 1: the encoder serves every
  task, so a unit of its width counts as much as a unit of all decoders together); at equal
  capacity, the cheaper one.

The objective is a proxy for accuracy that needs no evaluation at deployment; the measured
scores of the configurations it picks are in ``python -m bench.controllable``. The grid has
|widths|^(1+T) configurations (4 widths, 5 tasks: 4,096), enumerated in well under a second.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mtl.slim.cost import CostTable
from mtl.slim.widths import ENCODER


class SearchError(ValueError):
    """No configuration fits, or the budget or preference is malformed; the message says which."""


@dataclass
class Choice:
    """The chosen configuration, its counted FLOPs and its share of the full model's."""

    widths: dict[str, float]
    flops: int
    fraction: float


def normalised_preference(
    preference: Mapping[str, float] | None, tasks: Sequence[str]
) -> dict[str, float]:
    """Each task's preference, summing to 1 (tasks left out: 0; None: equal)."""
    if not preference:
        return {t: 1.0 / len(tasks) for t in tasks}
    unknown = sorted(set(preference) - set(tasks))
    if unknown:
        raise SearchError(f"preference: unknown tasks {unknown}; the model's tasks: {list(tasks)}")
    values = {t: preference.get(t, 0.0) for t in tasks}
    bad = {
        t: v
        for t, v in values.items()
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0
    }
    if bad:
        raise SearchError(f"preference: {bad}; expected numbers >= 0")
    total = sum(values.values())
    if total <= 0:
        raise SearchError("preference: every value is 0; give at least one task a weight > 0")
    return {t: v / total for t, v in values.items()}


def respects_preference(widths: Mapping[str, float], preference: Mapping[str, float]) -> bool:
    """Whether no task gets a narrower decoder than a task it is preferred to at least as much
    (equal preferences: equal widths)."""
    return all(
        widths[a] >= widths[b]
        for a, b in itertools.permutations(preference, 2)
        if preference[a] >= preference[b]
    )


def search(
    table: CostTable, budget: float, preference: Mapping[str, float] | None = None
) -> Choice:
    """The configuration of `table`'s widths that fits `budget` (a fraction of the full
    model's FLOPs, in (0, 1]) and follows `preference` (task -> weight; see the module rules)."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise SearchError(
            f"budget: {budget!r}; expected a fraction of the full model's FLOPs in (0, 1]"
        )
    tasks = list(table.decoders)
    weights = normalised_preference(preference, tasks)
    limit = budget * table.full
    best: tuple[float, int] | None = None
    chosen: dict[str, float] | None = None
    for combo in itertools.product(table.widths, repeat=1 + len(tasks)):
        widths = {ENCODER: combo[0], **dict(zip(tasks, combo[1:], strict=True))}
        flops = table.flops(widths)
        if flops > limit or not respects_preference(widths, weights):
            continue
        capacity = widths[ENCODER] + sum(weights[t] * widths[t] for t in tasks)
        key = (round(capacity, 12), -flops)
        if best is None or key > best:
            best, chosen = key, widths
    if chosen is None:
        smallest = table.flops(dict.fromkeys([ENCODER, *tasks], min(table.widths)))
        raise SearchError(
            f"budget: {budget} of the full model's FLOPs is below its smallest configuration "
            f"({smallest / table.full:.3f}); give budget >= {smallest / table.full:.3f}"
        )
    flops = table.flops(chosen)
    return Choice(chosen, flops, flops / table.full)
