"""Independent parts of a training batch, for balancers whose weights need several
mini-batches (MoDo, SDMGrad): the batch is split along its first axis and the losses recomputed
on each part, without touching the normalisation statistics of the step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


@contextmanager
def running_stats_set_aside(model: nn.Module) -> Iterator[None]:
    """Forward passes inside update copies of the BatchNorm running statistics, which are then
    dropped. The originals are swapped back, not copied into: the graphs of those passes keep
    the copies they used and stay valid for backward passes after the block."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [dict(m.named_buffers(recurse=False)) for m in norms]
    for module, buffers in zip(norms, saved, strict=True):
        for name, value in buffers.items():
            setattr(module, name, value.clone())
    try:
        yield
    finally:
        for module, buffers in zip(norms, saved, strict=True):
            for name, value in buffers.items():
                setattr(module, name, value)


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """`parts` consecutive slices of a batch along its first axis (sizes differ by at most
    one); entries that are not per-sample tensors are shared by every part."""
    size = batch["image"].shape[0]
    if size < parts:
        raise ValueError(
            f"data.batch_size: the balancer splits each process's batch into {parts} "
            f"independent parts, but this batch has {size} sample(s); use a data.batch_size of "
            f"at least {parts} per process"
        )
    pieces = [{} for _ in range(parts)]
    for key, value in batch.items():
        per_sample = isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size
        for piece, part in zip(
            pieces, value.tensor_split(parts) if per_sample else [value] * parts, strict=True
        ):
            piece[key] = part
    return pieces
