"""Concrete subspace learning (Tang et al., ICLR 2024): one mask shared by all task vectors,
m sampled from a relaxed Bernoulli (Concrete) distribution at temperature 0.5 whose logits start
at 0 (p = 0.5), each tensor's mask rescaled to mean 1 (m / mean(m)). With Task Arithmetic
(`ConcreteTaskArithmetic`), θ = θ₀ + λ Σ_t (m ⊙ τ_t); with AdaMerging (`ConcreteAdaMerging`),
θ = θ₀ + Σ_t λ_t ⊙ (m ⊙ τ_t), λ learned too. The logits are fitted by the objective of
`LearnedCoefficients` (entropy for classification-type heads, the labelled loss otherwise); the
merged model uses the expected mask (sigmoid of the logits, rescaled likewise).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.distributions import RelaxedBernoulli

from mtl.merging.adamerging import LearnedCoefficients, on_device
from mtl.merging.task_vectors import StateDict


def _rescaled(mask: Tensor) -> Tensor:
    return mask / mask.mean().clamp(min=1e-12)


class ConcreteTaskArithmetic(LearnedCoefficients):
    """Args:
    scaling: λ of Task Arithmetic (0.3).
    temperature: of the relaxed Bernoulli (0.5).
    seed: of the mask samples.
    objective, steps, lr: as `LearnedCoefficients` (Adam, no weight decay).
    """

    def __init__(
        self,
        scaling: float = 0.3,
        temperature: float = 0.5,
        objective: str = "entropy",
        steps: int = 100,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__(granularity="task", init=scaling, objective=objective, steps=steps, lr=lr)
        self.scaling, self.temperature, self.seed = float(scaling), float(temperature), int(seed)
        self.mask: StateDict | None = None  # after `learn`: the expected, rescaled mask

    def masked(
        self, vectors: Sequence[Mapping[str, Tensor]], mask: Mapping[str, Tensor]
    ) -> StateDict:
        return {k: self.scaling * mask[k] * sum(v[k] for v in vectors) for k in vectors[0]}

    def learn(
        self,
        base: Mapping[str, Tensor],
        vectors: Sequence[Mapping[str, Tensor]],
        module: torch.nn.Module,
        batches: Iterator[Mapping[str, Tensor]],
        device: torch.device,
    ) -> StateDict:
        base, vectors = on_device(base, vectors, device)
        logits = {k: torch.zeros_like(v, requires_grad=True) for k, v in base.items()}
        optimizer = torch.optim.Adam(list(logits.values()), lr=self.lr)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            for _ in range(self.steps):
                mask = {
                    k: _rescaled(RelaxedBernoulli(self.temperature, logits=z).rsample())
                    for k, z in logits.items()
                }
                delta = self.masked(vectors, mask)
                total = self.objective_loss(
                    module, {k: base[k] + delta[k] for k in base}, next(batches), device
                )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
        finally:
            torch.random.set_rng_state(generator_state)
        with torch.no_grad():
            self.mask = {k: _rescaled(torch.sigmoid(z)).cpu() for k, z in logits.items()}
            self.coefficients = torch.full((len(vectors), 1), self.scaling)
            return {
                k: v.cpu()
                for k, v in self.masked(
                    vectors, {k: m.to(device) for k, m in self.mask.items()}
                ).items()
            }


class ConcreteAdaMerging(LearnedCoefficients):
    """Concrete subspace with AdaMerging: the shared mask m (as `ConcreteTaskArithmetic`) and
    AdaMerging's coefficients, θ = θ₀ + Σ_t λ_t ⊙ (m ⊙ τ_t), in the paper's order:

    1. ``steps`` meta-learning steps, each on one mask sample and one batch: the inner step
       updates λ (AdaMerging's optimiser, clamp included) with the mask detached; the outer
       step then updates the mask logits through the updated λ. The outer gradient is the
       first-order one (λ held fixed, not differentiated through the inner step).
    2. ``adamerging_steps`` AdaMerging steps continue from λ with the expected mask fixed.

    The merged model uses the expected mask (sigmoid of the logits, each tensor rescaled to
    mean 1). With mask logits far above 0 the mask is all ones and this is AdaMerging with
    ``steps + adamerging_steps`` steps.

    Args:
    granularity, init, objective, lr, weight_decay, clamp: as `LearnedCoefficients`.
    steps: meta-learning steps (phase 1); adamerging_steps: phase 2.
    temperature: of the relaxed Bernoulli (0.5); mask_init: the initial logits (0: p = 0.5).
    seed: of the mask samples.
    """

    def __init__(
        self,
        granularity: str = "tensor",
        init: float = 0.3,
        objective: str = "entropy",
        steps: int = 100,
        adamerging_steps: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clamp: bool = True,
        temperature: float = 0.5,
        mask_init: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(granularity, init, objective, steps, lr, weight_decay, clamp)
        self.adamerging_steps, self.temperature = int(adamerging_steps), float(temperature)
        self.mask_init, self.seed = float(mask_init), int(seed)
        self.mask: StateDict | None = None  # after `learn`: the expected, rescaled mask

    def learn(
        self,
        base: Mapping[str, Tensor],
        vectors: Sequence[Mapping[str, Tensor]],
        module: torch.nn.Module,
        batches: Iterator[Mapping[str, Tensor]],
        device: torch.device,
    ) -> StateDict:
        base, vectors = on_device(base, vectors, device)
        columns = len(base) if self.granularity == "tensor" else 1
        coefficients = torch.full((len(vectors), columns), self.init, device=device)
        coefficients.requires_grad_(True)
        logits = {k: torch.full_like(v, self.mask_init).requires_grad_() for k, v in base.items()}
        inner = torch.optim.AdamW([coefficients], lr=self.lr, weight_decay=self.weight_decay)
        outer = torch.optim.Adam(list(logits.values()), lr=self.lr)

        def loss(mask: Mapping[str, Tensor], lam: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
            delta = self.combine([{k: mask[k] * v[k] for k in v} for v in vectors], lam)
            return self.objective_loss(
                module, {k: base[k] + delta[k] for k in base}, batch, device
            )

        def step(optimizer: torch.optim.Optimizer, total: Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if optimizer is inner and self.clamp:
                with torch.no_grad():
                    coefficients.clamp_(0.0, 1.0)

        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            for _ in range(self.steps):  # 1. meta-learning: λ (inner), then the mask (outer)
                batch = next(batches)
                mask = {
                    k: _rescaled(RelaxedBernoulli(self.temperature, logits=z).rsample())
                    for k, z in logits.items()
                }
                step(inner, loss({k: m.detach() for k, m in mask.items()}, coefficients, batch))
                step(outer, loss(mask, coefficients.detach(), batch))
        finally:
            torch.random.set_rng_state(generator_state)
        with torch.no_grad():
            expected = {k: _rescaled(torch.sigmoid(z)) for k, z in logits.items()}
        for _ in range(self.adamerging_steps):  # 2. AdaMerging with the mask fixed
            step(inner, loss(expected, coefficients, next(batches)))
        self.mask = {k: m.cpu() for k, m in expected.items()}
        self.coefficients = coefficients.detach().cpu()
        with torch.no_grad():
            masked = [{k: expected[k] * v[k] for k in v} for v in vectors]
            return {k: v.cpu() for k, v in self.combine(masked, coefficients.detach()).items()}
