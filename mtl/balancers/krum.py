"""Krum / Multi-Krum [Blanchard et al., NeurIPS 2017], a Byzantine-robust aggregator applied
to task gradients (as TorchJD offers it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.checks import integer_problem, raise_first
from mtl.balancers.gramian import GramianMethod


class Krum(GramianMethod):
    """Krum: score each task gradient by the sum of its distances to its T − f − 2 nearest
    other gradients (f = ``n_byzantine``; distances √(G_ii + G_jj − 2G_ij), summed unsquared as
    TorchJD does) and average the ``n_selected`` gradients with the lowest scores (weights
    1/m, 0 elsewhere). With the few tasks of dense prediction this selects whole task
    gradients; it is offered for completeness. Needs T ≥ f + 3 and T ≥ n_selected.
    """

    def __init__(
        self, num_tasks: int, n_byzantine: int = 0, n_selected: int = 1, mode: str = "param"
    ) -> None:
        super().__init__(mode)
        config = {"n_byzantine": n_byzantine, "n_selected": n_selected}
        raise_first(self.config_problems(config, [""] * num_tasks))
        self.n_byzantine, self.n_selected = n_byzantine, n_selected

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters, one line each (see mtl.balancers.checks)."""
        t, byzantine = len(tasks), config.get("n_byzantine", 0)
        problems = integer_problem(config, "n_byzantine", 0, 0, byzantine, "an integer >= 0")
        if not problems and t < byzantine + 3:
            problems.append(
                f"balancer.n_byzantine: {byzantine}; Krum needs at least n_byzantine + 3 = "
                f"{byzantine + 3} tasks, data.tasks has {t}"
            )
        problems += integer_problem(
            config, "n_selected", 1, 1, t, f"an integer from 1 to the number of tasks ({t})"
        )
        return problems

    def weights(self, gram: Tensor, context: BalanceContext) -> Tensor:
        t = gram.shape[0]
        norms = gram.diagonal()
        distances = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0.0).sqrt()
        distances.fill_diagonal_(torch.inf)  # a gradient is not its own neighbour
        nearest = distances.sort(dim=1).values[:, : t - self.n_byzantine - 2]
        chosen = nearest.sum(dim=1).argsort(stable=True)[: self.n_selected]
        weights = torch.zeros(t, dtype=gram.dtype)
        weights[chosen] = 1.0 / self.n_selected
        return weights
