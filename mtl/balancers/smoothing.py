"""CR-MOGM weight smoothing [Zhou et al., NeurIPS 2022], around any balancer that chooses task
weights (loss weighting or Gramian methods)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult
from mtl.balancers.checks import number_problems, raise_first


class CRMOGM(Balancer):
    """Smooths the weights λ̂_k the wrapped balancer chooses at step k:
    λ_k = α·λ_{k−1} + (1 − α)·λ̂_k, with λ_0 = λ̂_1 (the first step is unsmoothed); the update
    uses λ_k where the method would use λ̂_k (Jᵀλ_k, or Σ_t λ_{k,t} L_t).

    It works by routing the wrapped method's ``weights`` through the moving average, so every
    method built on `GramianMethod` or `LossWeighting` can be wrapped, in any mode and inside
    flat regions. λ is a buffer (saved in checkpoints) and moves once per optimiser step:
    further aggregations in the same step (flat regions' second part) smooth against λ_{k−1}
    without moving it. The wrapped method's weights are identical on every process (computed
    from all-reduced quantities), so λ is too. Learnable weights (uncertainty) keep their
    gradient, scaled by 1 − α.

    Args:
        balancer: the wrapped method (a `Balancer` with a ``weights`` method).
        num_tasks: number of tasks (given by `build_balancer`).
        alpha: weight of the previous λ: 0 disables smoothing, 1 freezes λ at λ̂_1. The paper
            (Cor. 1) lets α_k → 1 as the learning rate decays; 0.9 is TorchJD's fixed default.
    """

    def __init__(self, balancer: Balancer, num_tasks: int, alpha: float = 0.9) -> None:
        super().__init__()
        if not callable(getattr(balancer, "weights", None)):
            raise ValueError(
                f"smoothing=cr_mogm needs a balancer that chooses task weights; "
                f"{type(balancer).__name__} has no `weights`"
            )
        raise_first(self.config_problems({"alpha": alpha}, ()))
        self.balancer, self.alpha = balancer, alpha
        self.needs_task_gradients = balancer.needs_task_gradients
        self.register_buffer("previous", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("current", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("updated_step", torch.tensor(-1, dtype=torch.int64))
        # Route the wrapped method's weights through the average: its own backward and combine
        # then use the smoothed weights unchanged.
        balancer.weights = _SmoothedWeights(balancer.weights, self)

    @classmethod
    def config_problems(cls, config: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
        """Bad hyper-parameters of the ``smoothing`` node, one line each."""
        rules = [("alpha", 0.9, lambda v: 0 <= v <= 1, "a number in [0, 1]")]
        return number_problems(config, "smoothing", rules)

    @property
    def mode(self) -> str:
        return getattr(self.balancer, "mode", "param")

    @property
    def uses_representation(self) -> bool:
        return self.balancer.uses_representation

    @property
    def uses_stem(self) -> bool:
        return self.balancer.uses_stem

    def smooth(self, weights: Tensor, context: BalanceContext) -> Tensor:
        """λ_k from the wrapped method's λ̂_k; commits λ_k on the first call of a step."""
        first_call = int(self.updated_step) != context.step
        if first_call and int(self.num_updates) > 0:
            self.previous.copy_(self.current)
        if (
            first_call
            and int(self.num_updates) == 0
            or not first_call
            and int(self.num_updates) <= 1
        ):
            smoothed = weights  # λ_0 = λ̂_1
        else:
            smoothed = self.alpha * self.previous.to(weights) + (1 - self.alpha) * weights
        if first_call:
            self.current.copy_(smoothed.detach().to(self.current))
            self.num_updates += 1
            self.updated_step.fill_(context.step)
        return smoothed

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        self.balancer.observe(losses, context)

    def write_own_gradients(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        self.balancer.write_own_gradients(losses, context)

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        return self.balancer.backward(losses, context)

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        return self.balancer.combine(jacobian, losses, context)


class _SmoothedWeights:
    """The wrapped method's ``weights(x, context)`` followed by the wrapper's average (a class,
    not a closure, so that the balancer still pickles)."""

    def __init__(self, raw, wrapper: CRMOGM) -> None:
        self.raw, self.wrapper = raw, wrapper

    def __call__(self, statistic, context: BalanceContext) -> Tensor:
        return self.wrapper.smooth(self.raw(statistic, context), context)
