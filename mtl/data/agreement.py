"""Under DDP, every process takes the same decision about a batch that lost samples.

A process whose batch is empty (``data.skip_bad=true`` dropped every sample) cannot run the
step's forward and backward, and a process that met a bad sample (``data.skip_bad=false``,
the error carried in the batch by `mtl.data.skip.DeferBad`) must stop; either way the other
processes would wait in the step's collectives for it. So before the forward pass the processes
sum two flags (one all-reduce of two numbers per step):

- a bad sample anywhere: every process raises `DatasetError` with that sample's message (the
  messages are gathered, so each process names the file) and exits by itself;
- an empty batch anywhere: every process skips the update (no optimiser or scheduler step, as
  for a batch that is empty on one process).

Why all skip, rather than the empty process taking part with zero gradients: DDP averages
gradients over processes, so a zero contribution would silently shrink that update by the
share of empty processes (half the step on 2 processes), balancers that combine task
gradients (MGDA, PCGrad, ...) or average loss statistics (DWA, FAMO) would take the zeros for
data, and a forward pass needs at least one sample (BatchNorm). Skipping keeps every update
that is taken the exact DDP update; it costs the other processes' samples of that step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mtl.data.base import DatasetError
from mtl.data.skip import bad_sample, is_empty

log = logging.getLogger(__name__)

#: Sums a tensor over processes.
ReduceSum = Callable[[Tensor], Tensor]
#: Gathers one picklable value from every process, in rank order.
Gather = Callable[[Any], list[Any]]


def agree_on_batch(
    batch: Any, world_size: int, reduce_sum: ReduceSum, gather: Gather, device: torch.device
) -> bool:
    """Whether every process trains on its batch this step (False: all skip the update);
    raises `DatasetError` on every process when any process met a bad sample."""
    message, empty = bad_sample(batch), is_empty(batch)
    if world_size <= 1:
        if message is not None:
            raise DatasetError(message)
        return not empty
    flags = reduce_sum(torch.tensor([float(message is not None), float(empty)], device=device))
    failed, empties = flags.tolist()
    if failed:
        raise agreed_error(message, gather)
    if empties:
        log.warning(
            "%d process(es) had only bad samples in this step's batch (data.skip_bad=true): "
            "no process updates the model this step",
            int(empties),
        )
        return False
    return True


def agree_on_failure(
    message: str | None, reduce_sum: ReduceSum, gather: Gather, device: torch.device
) -> None:
    """Raise `DatasetError` on every process when any process met a bad sample (`message`)."""
    if float(reduce_sum(torch.tensor(float(message is not None), device=device))):
        raise agreed_error(message, gather)


def agreed_error(message: str | None, gather: Gather) -> DatasetError:
    """The error every process stops with: its own message, or the first process's that met
    a bad sample, naming that process. `gather` is a collective: every process calls it."""
    messages = gather(message)
    if message is not None:
        return DatasetError(message)
    rank, first = next((r, m) for r, m in enumerate(messages) if m is not None)
    return DatasetError(f"{first} (read by process {rank}; every process stops)")
