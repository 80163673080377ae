"""Learned merging coefficients: AdaMerging (Yang et al., ICLR 2024) and aTLAS (Zhang et al.,
NeurIPS 2024), θ = θ₀ + Σ_t λ_t ⊙ τ_t with one λ per task (``granularity=task``) or per task
and parameter tensor (``tensor``: AdaMerging's layer-wise, aTLAS).

Objectives, per task:
- ``entropy`` (AdaMerging): the mean per-pixel Shannon entropy of the prediction, which needs no
  label: softmax over classes for ``labels`` tasks (semseg, parts), Bernoulli for
  ``probability`` tasks (saliency, edge). Entropy has no meaning for depth or normals: those
  tasks use their own supervised loss instead, on labelled images (logged once).
- ``supervised`` (aTLAS): every task's own loss on labelled images.
Each task's term is weighted by its training loss weight. ``python -m mtl.merge`` feeds the
part of the training split that ``data.val_fraction`` held out from the single-task runs
(else, with no such split, the training split itself), never the reported split.

Written here: FusionBench's versions wrap CLIP classifiers and their datasets; the coefficient
model itself is a few lines with ``torch.func.functional_call``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from mtl.merging.task_vectors import MergeError, StateDict
from mtl.tasks import get_task

log = logging.getLogger(__name__)


def prediction_entropy(pred: Tensor, kind: str) -> Tensor:
    """Mean per-pixel entropy (nats) of raw outputs: softmax over channels for ``labels``,
    Bernoulli of the sigmoid for ``probability``."""
    if kind == "labels":
        log_p = F.log_softmax(pred.float(), dim=1)
        return -(log_p.exp() * log_p).sum(1).mean()
    if kind == "probability":
        p = torch.sigmoid(pred.float())
        return F.binary_cross_entropy_with_logits(pred.float(), p, reduction="mean")
    raise MergeError(f"entropy is not defined for a '{kind}' task")



def on_device(
    base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]], device: torch.device
) -> tuple[StateDict, list[StateDict]]:
    """θ₀ and the task vectors moved to `device` (where the coefficients are learned)."""
    moved = [{k: v.to(device) for k, v in state.items()} for state in (base, *vectors)]
    return moved[0], moved[1:]

class LearnedCoefficients:
    """Args:
    granularity: ``task`` (one λ per task) or ``tensor`` (one per task and parameter tensor).
    init: initial λ (AdaMerging 0.3; aTLAS 0).
    objective: ``entropy`` or ``supervised`` (see the module docstring).
    steps, lr, weight_decay: the optimiser (AdamW) and its number of steps, one batch each.
    clamp: keep λ in [0, 1] (the AdaMerging paper; FusionBench and aTLAS do not).
    """

    #: merged with data: `learn` instead of ``__call__``
    learns = True

    def __init__(
        self,
        granularity: str = "tensor",
        init: float = 0.3,
        objective: str = "entropy",
        steps: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clamp: bool = True,
    ) -> None:
        if granularity not in ("task", "tensor"):
            raise MergeError(f"method.granularity: '{granularity}'; expected 'task' or 'tensor'")
        if objective not in ("entropy", "supervised"):
            raise MergeError(f"method.objective: '{objective}'; expected 'entropy' or 'supervised'")
        self.granularity, self.init, self.objective = granularity, float(init), objective
        self.steps, self.lr, self.weight_decay = int(steps), float(lr), float(weight_decay)
        self.clamp = bool(clamp)
        self.coefficients: Tensor | None = None  # after `learn`: [T, 1] or [T, tensors]

    def __call__(
        self, base: Mapping[str, Tensor], vectors: Sequence[Mapping[str, Tensor]]
    ) -> StateDict:
        """With no data: the initial coefficients (task arithmetic at λ = init)."""
        return {k: self.init * torch.stack([v[k] for v in vectors]).sum(0) for k in base}

    def combine(self, vectors: Sequence[Mapping[str, Tensor]], coefficients: Tensor) -> StateDict:
        names = list(vectors[0])
        return {
            name: sum(
                coefficients[t, j if coefficients.shape[1] > 1 else 0] * v[name]
                for t, v in enumerate(vectors)
            )  # fmt: skip
            for j, name in enumerate(names)
        }

    def task_loss(self, task: str, pred: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        spec = get_task(task)
        if self.objective == "entropy" and spec.kind in ("labels", "probability"):
            return prediction_entropy(pred, spec.kind)
        return spec.loss(pred, batch[task])

    def objective_loss(
        self,
        module: torch.nn.Module,
        params: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        device: torch.device,
    ) -> Tensor:
        """The weighted objective of one batch through `module`'s model with the encoder
        tensors `params` (BatchNorm in eval mode: its statistics are not a coefficient)."""
        model, tasks = module.model.to(device).eval(), list(module.tasks)
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        preds = functional_call(model, dict(params), (batch["image"], tasks), strict=False)
        losses = {t: self.task_loss(t, preds[t], batch) for t in tasks}
        return torch.stack(list(module.weighted(losses).values())).sum()

    def learn(
        self,
        base: Mapping[str, Tensor],
        vectors: Sequence[Mapping[str, Tensor]],
        module: torch.nn.Module,
        batches: Iterator[Mapping[str, Tensor]],
        device: torch.device,
    ) -> StateDict:
        """The coefficients fitted on `batches` through `module` (a `MultiTaskModule` with the
        tasks' decoders in place); returns the merged task vector Σ_t λ_t ⊙ τ_t."""
        tasks = list(module.tasks)
        supervised = [t for t in tasks if self.objective == "supervised"
                      or get_task(t).kind not in ("labels", "probability")]  # fmt: skip
        if self.objective == "entropy" and supervised:
            log.info("entropy is undefined for %s: their labelled loss is used instead", supervised)
        base, vectors = on_device(base, vectors, device)
        columns = len(base) if self.granularity == "tensor" else 1
        coefficients = torch.full((len(vectors), columns), self.init, device=device)
        coefficients.requires_grad_(True)
        optimizer = torch.optim.AdamW([coefficients], lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.steps):
            delta = self.combine(vectors, coefficients)
            params = {k: base[k] + delta[k] for k in base}
            total = self.objective_loss(module, params, next(batches), device)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if self.clamp:
                with torch.no_grad():
                    coefficients.clamp_(0.0, 1.0)
        self.coefficients = coefficients.detach().cpu()
        with torch.no_grad():
            return {k: v.cpu() for k, v in self.combine(vectors, coefficients.detach()).items()}
