"""Task-based flat regions (SAM-MTL) [Phan et al., ICCV 2025], around any balancer.

Per task i: g_i = ∇L_i(θ); perturb the shared and task-i parameters by ε_i = ρ g_i/|g_i|
(ASAM: ρ T² g_i / |T g_i| with T = |w| + η elementwise); g_i^SAM = ∇L_i(θ + ε_i); the flat part
is h_i = g_i^SAM − g_i. The shared update is Agg(g_1..g_T) + Agg(h_1..h_T), the wrapped method
applied to each set separately; each head gets its plain SAM gradient. BatchNorm running
statistics are restored after the perturbed passes and the weights are restored bit for bit.
Cost: (1 + T) forwards and 2T backwards per step. Memory: the plain Jacobian (the plain part's
aggregation and each task's perturbation) and the flat one, T x P each: the flat rows are
computed at T different perturbed points, so even a method that needs only their Gramian must
hold them all (``balancer.jacobian=streamed`` does not apply).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext, Balancer, BalanceResult
from mtl.balancers.jacobian import TaskGradients, empty_jacobian, flatten, gramian


@contextmanager
def running_stats_frozen(model: nn.Module | None) -> Iterator[None]:
    """Keep BatchNorm running statistics exactly as they were through the enclosed passes."""
    norms = [
        m
        for m in (model.modules() if model else ())
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        for module, buffers in zip(norms, saved, strict=True):
            for name, value in buffers.items():
                getattr(module, name).copy_(value)


class FlatRegions(Balancer):
    """SAM-MTL around `balancer` (any loss-weighting or gradient method, ``param`` mode).

    Args:
        balancer: the aggregator applied to the plain and to the flat gradients.
        rho: neighbourhood radius.
        adaptive: ASAM's scale-invariant neighbourhood (the authors' default, with rho = 2).
        eta: ASAM's offset of the scale |w| + eta.
    """

    needs_task_gradients = True

    def __init__(
        self, balancer: Balancer, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01
    ) -> None:
        super().__init__()
        if getattr(balancer, "mode", "param") != "param":
            raise ValueError(
                "flat regions need per-parameter task gradients: use balancer.mode=param "
                f"(got {balancer.mode!r})"
            )
        self.balancer, self.rho, self.adaptive, self.eta = balancer, rho, adaptive, eta

    def _perturbation(self, grad: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
        if not self.adaptive:
            return self.rho * grad / grad.norm().clamp_min(1e-12)
        scale = flatten([p.detach().abs() + self.eta for p in params], params)
        return self.rho * scale**2 * grad / (scale * grad).norm().clamp_min(1e-12)

    def _flat_gradients(self, plain: TaskGradients, context: BalanceContext) -> TaskGradients:
        """The flat parts h_i = g_i^SAM − g_i of the shared parameters, each written over its
        SAM row as soon as it exists (no second T x P buffer for the difference), and each
        head's SAM gradient."""
        shared = list(context.shared_params)
        jacobian, heads = empty_jacobian(len(plain.heads), shared), {}
        for i, task in enumerate(plain.heads):
            own = list(context.task_params.get(task, ()))
            params = shared + own
            epsilon = self._perturbation(torch.cat([plain.jacobian[i], plain.heads[task]]), params)
            backup = [p.detach().clone() for p in params]
            try:
                with torch.no_grad():
                    for p, e in zip(
                        params, epsilon.split([p.numel() for p in params]), strict=True
                    ):
                        p.add_(e.view_as(p))
                loss = context.recompute_losses([task])[task]
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            finally:
                with torch.no_grad():
                    for p, saved in zip(params, backup, strict=True):
                        p.copy_(saved)
            flatten(grads[: len(shared)], shared, out=jacobian[i])
            # plain rows are averaged over processes already: the mean of the processes'
            # differences is the difference of the means
            jacobian[i] -= plain.jacobian[i]
            heads[task] = flatten(grads[len(shared) :], own)
        flat = TaskGradients(jacobian, heads)
        return flat.all_reduced(context) if context.world_size > 1 else flat

    def backward(self, losses: Mapping[str, Tensor], context: BalanceContext) -> BalanceResult:
        self.balancer.observe(losses, context)
        plain = TaskGradients.compute(losses, context)
        with running_stats_frozen(context.model):
            flat = self._flat_gradients(plain, context)
        update, weights = self.balancer.combine(plain.jacobian, losses, context)
        flat_update, _ = self.balancer.combine(flat.jacobian, losses, context)
        flat.write(update + flat_update, context)  # each head: its SAM gradient
        self.balancer.write_own_gradients(losses, context)
        weights = dict(zip(losses, weights.tolist(), strict=True))
        return BalanceResult(weights, gramian(plain.jacobian))
