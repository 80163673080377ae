"""Loss-weighting balancers: weights from the losses alone, one backward of the weighted sum.

Under DDP, gradients of the weighted sum are averaged by the normal backward; methods with a
loss history (DWA, FAMO) average their loss statistics over processes, so their state is
identical on every rank; RLW draws its weights from a generator seeded by (seed, step).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult


class LossWeighting(Balancer):
    """Base of the loss-only methods: choose weights from the losses, backward their sum."""

    def __init__(self, mode: str = "param") -> None:
        super().__init__()
        if mode != "param":
            raise ValueError(
                f"balancer.mode={mode!r}: {type(self).__name__} only weights losses and needs no "
                "per-task gradients; 'rep' mode is for gradient methods (pcgrad, cagrad, mgda, "
                "imtl, nash, aligned, upgrad). Use balancer.mode=param."
            )
        self.mode = mode

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        """Task weights in loss order (may carry gradient, e.g. learnable weights); no side
        effects: the loss history is updated by `observe`."""
        raise NotImplementedError

    def regulariser(self) -> Tensor | float:
        """A term added to the weighted loss (e.g. uncertainty weighting's log-variances)."""
        return 0.0

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        self.observe(losses, context)
        weights = self.weights(losses, context)
        total = (weights * torch.stack(list(losses.values()))).sum() + self.regulariser()
        context.backward(total)
        return BalanceResult(dict(zip(losses, weights.detach().tolist(), strict=True)))

    def combine(
        self, jacobian: Tensor, losses: Mapping[str, Tensor], context: BalanceContext
    ) -> tuple[Tensor, Tensor]:
        weights = self.weights(losses, context).detach().to(jacobian)
        return weights @ jacobian, weights

    def write_own_gradients(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return
        weights = self.weights(losses, context)
        total = (weights * _stacked(losses)).sum() + self.regulariser()
        grads = torch.autograd.grad(total, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = context.all_reduce_mean(g) if context.world_size > 1 else g


def _stacked(losses: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([loss.detach() for loss in losses.values()])


class Equal(LossWeighting):
    """Every task loss with weight 1 (the static loss weights are applied before)."""

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        return torch.ones(len(losses), device=next(iter(losses.values())).device)


class Uncertainty(LossWeighting):
    """Homoscedastic uncertainty weighting [Kendall et al. 2018].

    L = Σ_i ½·exp(−s_i)·L_i + ½·s_i with s_i = log σ_i² learned with the model.
    """

    def __init__(self, num_tasks: int, init_log_var: float = 0.0, mode: str = "param") -> None:
        super().__init__(mode)
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init_log_var)))

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        return 0.5 * torch.exp(-self.log_vars)

    def regulariser(self) -> Tensor:
        return 0.5 * self.log_vars.sum()


class DWA(LossWeighting):
    """Dynamic Weight Average [Liu et al. 2019].

    w_i(t) = T·softmax(r(t−1)/temperature)_i with r_i(t−1) = L̄_i(t−1) / L̄_i(t−2), the ratio of
    the task's mean training loss over the last two epochs; weight 1 in the first two epochs.
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0, mode: str = "param") -> None:
        super().__init__(mode)
        self.temperature = temperature
        self.register_buffer("epoch_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("current_epoch", torch.full((), -1, dtype=torch.long))

    def _close_epoch(self) -> None:
        if self.epoch_count > 0:
            mean = self.epoch_sum / self.epoch_count
            self.history.copy_(torch.stack([self.history[1], mean]))
            self.epochs_seen += 1
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        if context.epoch != int(self.current_epoch):
            self._close_epoch()
            self.current_epoch.fill_(context.epoch)
        self.epoch_sum += context.all_reduce_mean(_stacked(losses)).to(self.epoch_sum)
        self.epoch_count += 1

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        device = next(iter(losses.values())).device
        if self.epochs_seen < 2:
            return torch.ones(len(losses), device=device)
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        return (len(losses) * torch.softmax(ratio / self.temperature, dim=0)).float().to(device)


class RandomLossWeighting(LossWeighting):
    """Random loss weighting [Lin et al. 2022]: w = softmax(z), z ~ N(0, I) drawn anew each step.

    The weights sum to 1 (the paper's definition), so compared with `equal` the effective
    learning rate is divided by T.
    """

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        z = torch.randn(len(losses), generator=context.generator(), dtype=torch.float64)
        return torch.softmax(z, dim=0).float().to(next(iter(losses.values())).device)


class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization [Liu et al. 2023], O(1) in the number of tasks.

    Task logits ξ give z = softmax(ξ); the model minimises Σ_i z_i·log(L_i) / c with
    c = Σ_i z_i / L_i (so the gradient is Σ_i (z_i / L_i / c)·∇L_i). ξ is updated with Adam
    from the decrease of the log-losses, δ = log L(t−1) − log L(t), through the softmax's
    Jacobian. The decrease is measured on the next step's batch (no extra forward pass).
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_loss: float = 0.0,
        mode: str = "param",
    ) -> None:
        super().__init__(mode)
        self.min_loss = min_loss
        # ξ is a buffer, not a parameter: it has its own optimiser, not the model's.
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("previous_loss", torch.zeros(num_tasks))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self.lr, self.weight_decay = lr, weight_decay
        self._optimizer_state: dict | None = None

    def _update_logits(self, loss: Tensor) -> None:
        shift = self.min_loss - 1e-8
        delta = (self.previous_loss - shift).log() - (loss - shift).log()
        logits = self.logits.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.softmax(logits, dim=0), logits, grad_outputs=delta)
        logits.grad = grad
        optimizer = torch.optim.Adam([logits], lr=self.lr, weight_decay=self.weight_decay)
        if self._optimizer_state is not None:
            optimizer.load_state_dict(self._optimizer_state)
        optimizer.step()
        self._optimizer_state = optimizer.state_dict()
        self.logits.copy_(logits.detach())

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        loss = context.all_reduce_mean(_stacked(losses)).to(self.logits)
        if self.has_previous:
            self._update_logits(loss)
        self.previous_loss.copy_(loss)
        self.has_previous.fill_(True)

    def weights(self, losses: Mapping[str, Tensor], context: BalanceContext) -> Tensor:
        """Weights at the losses last observed (this step's, averaged over processes)."""
        z = F.softmax(self.logits, dim=0)
        shifted = self.previous_loss - self.min_loss + 1e-8
        c = (z / shifted).sum()
        # d/dθ Σ z_i log(L_i) / c  ==  Σ (z_i / (L_i c)) ∇L_i: weights of the plain losses.
        return (z / shifted / c).to(next(iter(losses.values())).device)

    def get_extra_state(self) -> dict | None:
        return self._optimizer_state

    def set_extra_state(self, state: dict | None) -> None:
        self._optimizer_state = state
