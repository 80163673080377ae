"""What the processes of a DDP run need beyond Lightning's collectives: gathering Python values,
and stopping together on an error."""

from __future__ import annotations

import logging
import subprocess
from typing import Any

import lightning as L
import torch.distributed as dist

log = logging.getLogger(__name__)

#: How long the launching process waits for the others to exit after a shared error.
CHILD_EXIT_TIMEOUT_S = 60.0


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, in rank order (``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def gather_before_stopping(trainer: L.Trainer, value: Any) -> list[Any]:
    """`gather_objects`, for processes that all stop next with the same error: each then exits
    by itself, with its own ``error:`` line.

    Lightning's script launcher (``strategy=ddp`` started from one command) SIGKILLs the
    launching process as soon as it sees another process exit with an error, so the command
    would end in status 137 without its message. The launching process therefore takes its
    child processes out of Lightning's watch before the gather (none can exit before it), and
    after it waits for them to exit (killing any still there after `CHILD_EXIT_TIMEOUT_S`)."""
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None)
    children: list[subprocess.Popen] = []
    if isinstance(procs, list) and procs and all(isinstance(p, subprocess.Popen) for p in procs):
        children = list(procs)
        procs.clear()  # the launcher's observer thread polls this very list
    values = gather_objects(value)
    for child in children:
        try:
            child.wait(CHILD_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not exit after the error; killing it", child.pid)
            child.kill()
    return values
