"""Concrete subspace learning (Tang et al., ICLR 2024), with Task Arithmetic: one mask shared
by all task vectors, θ = θ₀ + λ Σ_t (m ⊙ τ_t), m sampled from a relaxed Bernoulli (Concrete)
distribution at temperature 0.5 whose logits start at 0 (p = 0.5), each tensor's mask rescaled
to mean 1 (m / mean(m)). The logits are fitted by the objective of `LearnedCoefficients`
(entropy for classification-type heads, the labelled loss otherwise); the merged model uses
the expected mask (sigmoid of the logits, rescaled likewise).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.distributions import RelaxedBernoulli

from mtl.merging.adamerging import LearnedCoefficients
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
        base = {k: v.to(device) for k, v in base.items()}
        vectors = [{k: v.to(device) for k, v in vector.items()} for vector in vectors]
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
