"""Smooth Tchebycheff scalarisation [Lin et al., ICML 2024]: a smooth maximum of the (normalised)
task losses, so the update favours the task that is currently worst.

Two forms:

- ``libmtl`` (default; LibMTL ``STCH.py``, from the authors' MTL code): during the warm-up
  epochs 0 .. E_w − 1 the loss is Σ_t log(L_t + 1e-20); in epoch E_w it stays that and the mean
  loss of every task over that epoch is recorded as the nadir point z; from epoch E_w + 1 on
  the loss is T·μ·log Σ_t exp(ℓ_t / μ) with ℓ_t = log(L_t / z_t + 1e-20), so the gradient
  weights are T·softmax(ℓ/μ)_t / L_t.
- ``torchjd`` (TorchJD's ``STCH`` scalariser): μ·log Σ_t exp(λ_t (L_t − z_t) / μ) on the raw
  losses from the first step, with a preference λ (default 1/T) and a fixed reference z
  (default 0); gradient weights λ_t·softmax(λ⊙(L − z)/μ)_t.

The nadir point is a buffer (it lands in checkpoints) and is averaged from the losses of the
global batch (all-reduced under DDP), so it is identical on every process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl.balancers.base import BalanceContext
from mtl.balancers.scalariser import Scalariser, global_losses

FORMS = ("libmtl", "torchjd")
#: LibMTL's offset inside the logs
TINY = 1e-20


class STCH(Scalariser):
    """Smooth Tchebycheff scalarisation.

    Args:
        num_tasks: T.
        mu: smoothing μ > 0 (small μ: close to training only the worst task).
        warmup_epochs: E_w of the ``libmtl`` form (0-based epochs of log-loss training; the
            nadir is recorded during epoch E_w).
        form: ``libmtl`` or ``torchjd`` (see the module docstring).
        preference: λ of the ``torchjd`` form (T numbers; null: 1/T each).
        reference: z of the ``torchjd`` form (T numbers; null: 0).
    """

    def __init__(
        self,
        num_tasks: int,
        mu: float = 1.0,
        warmup_epochs: int = 4,
        form: str = "libmtl",
        preference: Sequence[float] | None = None,
        reference: Sequence[float] | None = None,
        mode: str = "param",
    ) -> None:
        super().__init__(mode)
        if form not in FORMS:
            raise ValueError(f"balancer.form={form!r}; expected one of {FORMS}")
        if not mu > 0:
            raise ValueError(f"balancer.mu={mu}; expected a positive number")
        if warmup_epochs < 0:
            raise ValueError(f"balancer.warmup_epochs={warmup_epochs}; expected 0 or more")
        self.mu, self.warmup_epochs, self.form = float(mu), int(warmup_epochs), form
        self.preference = _vector("preference", preference, num_tasks, 1.0 / num_tasks)
        self.reference = _vector("reference", reference, num_tasks, 0.0)
        self.register_buffer("nadir_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("nadir_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir_epoch", torch.full((), -1, dtype=torch.long))
        self.register_buffer("nadir", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("has_nadir", torch.zeros((), dtype=torch.bool))

    def observe(self, losses: Mapping[str, Tensor], context: BalanceContext) -> None:
        """``libmtl``: accumulate the losses of the nadir epoch (the first epoch ≥ E_w with a
        step) and fix the nadir point on the first step after it."""
        if self.form != "libmtl" or self.has_nadir or context.epoch < self.warmup_epochs:
            return
        if self.nadir_epoch < 0:
            self.nadir_epoch.fill_(context.epoch)
        if context.epoch == int(self.nadir_epoch):
            self.nadir_sum += global_losses(losses, context).to(self.nadir_sum)
            self.nadir_count += 1
        else:
            self.nadir.copy_(self.nadir_sum / self.nadir_count)
            self.has_nadir.fill_(True)

    def scalarise(self, losses: Tensor, context: BalanceContext) -> Tensor:
        if self.form == "torchjd":
            scaled = self.preference * (losses - self.reference)
            return self.mu * torch.logsumexp(scaled / self.mu, 0)
        if not self.has_nadir:
            return (losses + TINY).log().sum()
        normalised = (losses / self.nadir.cpu() + TINY).log()
        return len(losses) * self.mu * torch.logsumexp(normalised / self.mu, 0)


def _vector(key: str, values: Sequence[float] | None, length: int, default: float) -> Tensor:
    if values is None:
        return torch.full((length,), default, dtype=torch.float64)
    if len(values) != length:
        raise ValueError(f"balancer.{key}: {len(values)} numbers; expected one per task ({length})")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
