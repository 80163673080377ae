"""Impartial MTL in full [Liu et al., ICLR 2021]: IMTL-L's learnable loss scales, then IMTL-G on
the gradients of the scaled losses (LibMTL ``IMTL.py``).

The composition is generic (`ScaledLosses`): a learnable loss weighting picks weights w(s) and a
gradient method balances the task gradients of w_t·L_t. The method only sees the weights as
constants (its weights depend on the gradients alone, and an additive term of the loss such as
IMTL-L's −s_t has no gradient in the model); the weighting's own parameters get the gradient of
its full objective (Σ_t w_t(s)·L_t + regulariser), as if it were trained alone. The shared
update is Σ_t α_t·w_t·∇L_t, reported as the weights α_t·w_t of the unscaled losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult
from mtl.balancers.gramian import IMTL, GramianMethod
from mtl.balancers.imtl_l import IMTLL
from mtl.balancers.weighting import LossWeighting


class ScaledLosses(Balancer):
    """A learnable loss weighting applied to the losses before a gradient method.

    Args:
        scales: the loss weighting (its weights, e.g. e^{s}, scale the losses).
        method: the gradient method that balances the scaled losses' gradients.
    """

    needs_task_gradients = True

    def __init__(self, scales: LossWeighting, method: GramianMethod) -> None:
        super().__init__()
        self.scales, self.method = scales, method

    @property
    def uses_representation(self) -> bool:
        return self.method.uses_representation

    @property
    def uses_stem(self) -> bool:
        return self.method.uses_stem

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        self.scales.observe(losses, context)
        self.method.observe(losses, context)

    def _scaled(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        return self.scales.weights(losses, context).detach()

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        self.scales.observe(losses, context)
        scale = self._scaled(losses, context)
        scaled = {t: s * loss for (t, loss), s in zip(losses.items(), scale, strict=True)}
        used_backward = []

        def backward_with_scales(total: Tensor) -> None:
            # rep mode ends in one framework backward: the scales' objective joins it, so DDP
            # averages their gradient like every other one.
            used_backward.append(True)
            own = self.scales.weights(losses, context) * _detached(losses)
            context.backward(total + own.sum() + self.scales.regulariser())

        result = self.method.backward(scaled, replace(context, backward=backward_with_scales))
        if not used_backward:  # param mode: the method wrote .grad itself
            self.scales.write_own_gradients(losses, context)
        weights = {t: result.weights[t] * float(s) for t, s in zip(losses, scale, strict=True)}
        return BalanceResult(weights, result.gramian)

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        scale = self._scaled(losses, context).to(jacobian)
        update, weights = self.method.combine(scale[:, None] * jacobian, losses, context)
        return update, weights.to(jacobian) * scale

    def write_own_gradients(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        self.scales.write_own_gradients(losses, context)


def _detached(losses: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([loss.detach() for loss in losses.values()])


class IMTLFull(ScaledLosses):
    """IMTL-L scales (s₀ = 0) followed by IMTL-G, in ``param`` or ``rep`` mode."""

    def __init__(self, num_tasks: int, init_scale: float = 0.0, mode: str = "param") -> None:
        super().__init__(IMTLL(num_tasks, init_scale), IMTL(mode))
        self.mode = mode
