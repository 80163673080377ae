"""The regulariser interface: a loss on the task saliencies of the shared features."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl.models.multitask import Decoded


class RepresentationRegularizer(nn.Module):
    """A loss on the task saliencies S_t = ∂L_t/∂Z (of log L_t with `log_loss`), Z the shared
    features the heads decode, taken through the heads alone (``Decoded.probes``).

    Subclasses implement `terms`. The training step calls `gradients` before the balancer and
    adds them to the balancer's update, so every balancer and mode composes with it.
    """

    #: saliencies of log L_t instead of L_t (scale-free across tasks)
    log_loss: bool = False

    def terms(self, saliencies: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
        """Named, weighted terms from ``saliencies[level][task]`` (float32, shaped like the
        level's features); their sum is the regulariser."""
        raise NotImplementedError

    def saliencies(
        self, losses: Mapping[str, Tensor], probes: Sequence[Tensor]
    ) -> list[list[Tensor]]:
        """``[level][task]`` gradients of each task's loss with respect to the probes, with a
        graph (second order: the regulariser's gradient reaches heads and backbone)."""
        per_task = []
        for loss in losses.values():
            value = torch.log(loss) if self.log_loss else loss
            grads = torch.autograd.grad(
                value, list(probes), create_graph=True, retain_graph=True, allow_unused=True
            )
            per_task.append(
                [
                    torch.zeros_like(p) if g is None else g
                    for g, p in zip(grads, probes, strict=True)
                ]
            )
        return [[task[level].float() for task in per_task] for level in range(len(probes))]

    def gradients(
        self,
        losses: Mapping[str, Tensor],
        decoded: Decoded,
        params: Sequence[nn.Parameter],
        shared_params: Sequence[nn.Parameter],
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[list[Tensor | None], dict[str, float]]:
        """The regulariser's gradient for each of `params` (None where it has none), averaged
        over processes by `all_reduce_mean` when given, and its terms' values for the log.

        The forward graph is kept for the balancer. When the heads decoded from detached
        copies of the features (``rep`` mode), the gradient reaching those copies is carried
        into the backbone by one more backward through it.
        """
        if decoded.probes is None:
            raise ValueError(
                "a representation regulariser needs MultiTaskModel.decode(..., "
                "probe_features=True) or detach_features=True"
            )
        probes = list(decoded.probes)
        terms = self.terms(self.saliencies(losses, probes))
        total = torch.stack(list(terms.values())).sum()
        detached = decoded.head_inputs[0] is probes[0]
        inputs = list(params) + (probes if detached else [])
        grads = list(torch.autograd.grad(total, inputs, retain_graph=True, allow_unused=True))
        grads, probe_grads = grads[: len(params)], grads[len(params) :]
        if detached:
            shared = list(shared_params)
            pairs = [
                (f, g) for f, g in zip(decoded.features, probe_grads, strict=True) if g is not None
            ]
            if pairs and shared:
                surrogate = sum((f * g).sum() for f, g in pairs)
                carried = torch.autograd.grad(
                    surrogate, shared, retain_graph=True, allow_unused=True
                )
                index = {id(p): i for i, p in enumerate(params)}
                for p, g in zip(shared, carried, strict=True):
                    i = index.get(id(p))
                    if g is not None and i is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        if all_reduce_mean is not None:
            grads = _all_reduced(grads, params, all_reduce_mean)
        values = {name: float(value.detach()) for name, value in terms.items()}
        return grads, values


def _all_reduced(
    grads: list[Tensor | None], params: Sequence[nn.Parameter], mean: Callable[[Tensor], Tensor]
) -> list[Tensor | None]:
    """The gradients averaged over processes in one collective (every process sends every
    parameter's slot, zeros where it has no gradient, so the calls match)."""
    flat = torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )
    averaged = mean(flat).split([p.numel() for p in params])
    return [a.view_as(p) for a, p in zip(averaged, params, strict=True)]


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad
