"""The Gramian of the task gradients without the T x P Jacobian (``balancer.jacobian=streamed``).

One batched backward (``torch.func.vmap`` over the T unit vectors of the losses) computes the
T per-task gradients of every parameter together. A hook on each parameter receives its T rows
as soon as the backward produces them, adds their T x T products to the Gramian and lets them
go: the backward returns stride-0 zeros in their place, so at no time does the step hold more
than the rows of the parameters being processed (one bucket of them under DDP). Each
task-specific parameter keeps its own task's row (the heads' update). The caller then solves
the weights on the Gramian and runs one backward of Σ w_i L_i for the shared update.

Where the context names a CNN's stem (``BalanceContext.stem``), the batched backward stops
there and the stem's few parameters get their rows from one plain backward per task: T copies
of its full-resolution activation gradients would outweigh everything else the step holds.

Hooks see batched tensors inside ``vmap``; a custom autograd function with a ``vmap`` rule
(`_Rows`) is PyTorch's public way to receive a batched tensor's T rows at once.

Under DDP the rows of each bucket of parameters (fixed buckets in a fixed order, the same on
every process) are averaged over processes before their Gramian contribution, so the Gramian is
the exact one of the global batch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtl.balancers.base import BalanceContext

#: Elements of the shared parameters per all-reduced bucket under DDP (T rows each).
BUCKET_ELEMENTS = 1 << 22
#: Columns per float32 block product of `add_products` (as `mtl.balancers.jacobian.gramian`).
BLOCK = 4096


class BatchedBackwardError(RuntimeError):
    """The batched backward failed (an operator that cannot run under ``vmap``)."""


class StreamedGradients(NamedTuple):
    """What the batched backward leaves: the Gramian, each head's own gradient, and the
    operators that had no batching rule (``vmap`` ran them once per task: correct, as fast as
    the stored mode's per-task passes for that operator)."""

    gramian: Tensor  # T x T, float64, CPU, of the global batch
    heads: dict[str, list[Tensor]]  # task -> gradient of each of its own parameters
    per_task_operators: frozenset[str]


#: functorch's warning for an operator it runs in a loop over the batched dimension
_FALLBACK = re.compile(r"batching rule for ([\w:.]+)")


class _Rows(torch.autograd.Function):
    """Identity-free sink: calls ``sink(rows)`` with the T x ... rows of a gradient that is
    batched over the tasks (the ``vmap`` rule), or with one row outside ``vmap``."""

    @staticmethod
    def forward(grad: Tensor, sink: Callable[[Tensor], None]) -> Tensor:
        sink(grad.unsqueeze(0))
        return grad.new_zeros(())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def vmap(info, in_dims, grad: Tensor, sink: Callable[[Tensor], None]):
        dim = in_dims[0]
        rows = (
            grad.movedim(dim, 0) if dim is not None else grad.expand(info.batch_size, *grad.shape)
        )
        sink(rows)
        return grad.new_zeros(()), None


@torch.no_grad()
def add_products(total: Tensor, rows: Tensor) -> None:
    """total += rows rowsᵀ (float64 accumulator), the products formed in float32 over column
    blocks of `BLOCK` as `mtl.balancers.jacobian.gramian` forms them."""
    r = rows.reshape(rows.shape[0], -1)
    r = r if r.dtype in (torch.float32, torch.float64) else r.float()
    whole = r.shape[1] // BLOCK * BLOCK
    if whole:
        blocks = r[:, :whole].reshape(r.shape[0], -1, BLOCK).transpose(0, 1)
        total += torch.bmm(blocks, blocks.transpose(1, 2)).double().sum(0)
    if whole < r.shape[1]:
        rest = r[:, whole:]
        total += (rest @ rest.T).double()


class _Accumulator:
    """Receives each shared parameter's T rows: adds their products to the Gramian at once
    (one process), or packs them into fixed buckets that are averaged over processes, in bucket
    order, before their products are added (DDP)."""

    def __init__(self, shared: Sequence[nn.Parameter], tasks: int, context: BalanceContext):
        self.context = context
        first = shared[0] if shared else torch.zeros(())
        self.gram = torch.zeros(tasks, tasks, dtype=torch.float64, device=first.device)
        self.tasks = tasks
        self.distributed = context.world_size > 1
        # Buckets in reverse registration order (about the order the backward reaches them).
        self.bucket_of: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, offset)
        self.sizes: list[int] = []
        self.expected: list[int] = []
        size = count = 0
        for p in reversed(list(shared)):
            if size and size + p.numel() > BUCKET_ELEMENTS:
                self.sizes.append(size)
                self.expected.append(count)
                size = count = 0
            self.bucket_of[id(p)] = (len(self.sizes), size)
            size, count = size + p.numel(), count + 1
        if count:
            self.sizes.append(size)
            self.expected.append(count)
        self.buffers: dict[int, Tensor] = {}
        self.arrived = [0] * len(self.sizes)
        self.next = 0  # the next bucket to reduce: every process reduces them in this order
        self.dtype = first.dtype if first.is_floating_point() else torch.float32

    def add(self, param: nn.Parameter, rows: Tensor) -> None:
        if not self.distributed:
            add_products(self.gram, rows)
            return
        bucket, offset = self.bucket_of[id(param)]
        if bucket not in self.buffers:
            self.buffers[bucket] = rows.new_zeros(self.tasks, self.sizes[bucket])
        n = param.numel()
        self.buffers[bucket][:, offset : offset + n] = rows.reshape(self.tasks, n)
        self.arrived[bucket] += 1
        while self.next < len(self.sizes) and self.arrived[self.next] == self.expected[self.next]:
            self._reduce(self.next)

    def _reduce(self, bucket: int) -> None:
        rows = self.buffers.pop(bucket, None)
        if rows is None:  # no parameter of it had a gradient on this process
            rows = torch.zeros(
                self.tasks, self.sizes[bucket], dtype=self.dtype, device=self.gram.device
            )
        add_products(self.gram, self.context.all_reduce_mean(rows))
        self.next += 1

    def finish(self) -> Tensor:
        """The Gramian (float64, CPU) once the backward is over: buckets with parameters that
        had no gradient are reduced now, zeros in their place, still in bucket order."""
        while self.distributed and self.next < len(self.sizes):
            self._reduce(self.next)
        return self.gram.cpu()


def streamed_gramian(
    losses: Mapping[str, Tensor], context: BalanceContext
) -> StreamedGradients:
    """(G, each head's own gradient) from one batched backward over the T losses, never
    holding the T x P Jacobian of the shared parameters. Where every path from the losses to
    the shared parameters passes through ``context.features``, each task's head is
    backpropagated once on its own and the batched backward starts at the features (T x the
    features' size held meanwhile); otherwise it starts at the losses. The graph is kept for the
    backward of Σ w_i L_i. Heads' gradients are averaged over processes (zeros where its task
    does not use a parameter).

    Raises:
        BatchedBackwardError: an operator of the backward has no batching rule.
    """
    tasks = list(losses)
    shared = list(context.shared_params)
    owners = {id(p): (i, t) for i, t in enumerate(tasks) for p in context.task_params.get(t, ())}
    heads = {t: [None] * len(context.task_params.get(t, ())) for t in tasks}
    slots = {id(p): j for t in tasks for j, p in enumerate(context.task_params.get(t, ()))}
    accumulator = _Accumulator(shared, len(tasks), context)
    params = shared + [p for t in tasks for p in context.task_params.get(t, ())]

    def sink_of(param: nn.Parameter) -> Callable[[Tensor], None]:
        if id(param) in owners:
            index, task = owners[id(param)]

            def keep_own_row(rows: Tensor) -> None:
                heads[task][slots[id(param)]] = rows[index].clone()

            return keep_own_row
        return lambda rows: accumulator.add(param, rows)

    def hook_of(param: nn.Parameter):
        sink = sink_of(param)

        def hook(grad: Tensor) -> Tensor:
            _Rows.apply(grad, sink)
            return grad.new_zeros(()).expand(param.shape)  # nothing is kept for the result

        return hook

    features = list(context.features or ())
    stem_params: list[nn.Parameter] = []
    if ends_at_features(losses, features, shared):
        # Each task's own backward covers its head only and stops at the features; the batched
        # one starts there, so no head is run T times.
        rows, own_grads = _head_passes(losses, features, context)
        units, heads_done = tuple(rows), True
        outputs, inputs = features, shared
        if context.stem is not None and context.stem.grad_fn is not None and context.stem_params:
            # the batched backward stops at the stem: T copies of its activation gradients
            # would outweigh everything else the step holds (see `_stem_rows`)
            stem_ids = {id(p) for p in context.stem_params}
            stem_params = [p for p in shared if id(p) in stem_ids]
            inputs = [p for p in shared if id(p) not in stem_ids]
    else:
        values = torch.stack(list(losses.values()))
        units = (torch.eye(len(tasks), dtype=values.dtype, device=values.device),)
        outputs, inputs, heads_done = values, params, False
    handles = [p.register_hook(hook_of(p)) for p in inputs]

    targets = [*inputs, context.stem] if stem_params else inputs

    def backward(*unit: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            outputs, targets, unit, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    # oneDNN's convolution backward under vmap holds two more copies of a weight's T rows than
    # PyTorch's own kernels (136 against 92 MiB for a 512x512x3x3 weight at T=5)
    onednn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = torch.func.vmap(backward)(*units)
    except RuntimeError as error:
        raise BatchedBackwardError(str(error).splitlines()[0]) from error
    finally:
        torch.backends.mkldnn.enabled = onednn
        for handle in handles:
            handle.remove()
    units = rows = None  # the feature rows are no longer needed
    if stem_params:
        _stem_rows(context.stem, grads[-1], stem_params, accumulator)
    grads = None
    if heads_done:
        heads = own_grads
    gram = accumulator.finish()
    own = {
        t: [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, context.task_params.get(t, ()), strict=True)
        ]
        for t, grads in heads.items()
    }
    looped = {m.group(1).rstrip(".") for w in caught if (m := _FALLBACK.search(str(w.message)))}
    for other in caught:  # anything else is shown as it would have been
        if not _FALLBACK.search(str(other.message)):
            warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    heads = _averaged(own, context) if context.world_size > 1 else own
    return StreamedGradients(gram, heads, frozenset(looped))


def ends_at_features(
    losses: Mapping[str, Tensor], features: Sequence[Tensor], shared: Sequence[Tensor]
) -> bool:
    """Whether every path from the losses back to the shared parameters passes through the
    `features` (no auxiliary loss or other tensor reaches the backbone around them): a walk
    of the losses' graph that stops at the features' nodes meets no shared parameter."""
    if not features or any(f.grad_fn is None for f in features):
        return False
    stops, shared_ids = {f.grad_fn for f in features}, {id(p) for p in shared}
    seen, stack = set(), [loss.grad_fn for loss in losses.values()]
    while stack:
        node = stack.pop()
        if node is None or node in stops or node in seen:
            continue
        seen.add(node)
        if id(getattr(node, "variable", None)) in shared_ids:  # AccumulateGrad of a shared one
            return False
        stack.extend(child for child, _ in node.next_functions)
    return True


def _head_passes(
    losses: Mapping[str, Tensor], features: Sequence[Tensor], context: BalanceContext
) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
    """One backward per task through its head to the features: each feature level's T rows
    (T x its shape) and each head's own gradient."""
    rows = [f.new_empty(len(losses), *f.shape) for f in features]
    heads = {}
    for i, (task, loss) in enumerate(losses.items()):
        own = list(context.task_params.get(task, ()))
        grads = torch.autograd.grad(
            loss, [*features, *own], retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for level, grad in zip(rows, grads, strict=False):
            level[i] = grad
        heads[task] = list(grads[len(features) :])
    return rows, heads


def _stem_rows(
    stem: Tensor, rows: Tensor, params: list[nn.Parameter], accumulator: _Accumulator
) -> None:
    """The stem parameters' T rows, from one plain backward per task of the stem's T gradient
    rows, into the Gramian. The stem works at the highest resolution and holds few parameters:
    one task at a time, its activation gradients are those of an ordinary backward, and its
    T x P rows stay small."""
    per_param: list[list[Tensor]] = [[] for _ in params]
    for row in rows:
        grads = torch.autograd.grad(
            stem, params, row, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        for collected, grad in zip(per_param, grads, strict=True):
            collected.append(grad)
    for param, collected in zip(params, per_param, strict=True):
        accumulator.add(param, torch.stack(collected))


def _averaged(heads: dict[str, list[Tensor]], context: BalanceContext) -> dict[str, list[Tensor]]:
    """The heads' gradients averaged over processes, in one call."""
    flat = [g for grads in heads.values() for g in grads]
    if not flat:
        return heads
    pieces = iter(
        context.all_reduce_mean(torch.cat([g.reshape(-1) for g in flat])).split(
            [g.numel() for g in flat]
        )
    )
    return {t: [next(pieces).view_as(g) for g in grads] for t, grads in heads.items()}
