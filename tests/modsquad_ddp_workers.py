"""Process bodies of the Mod-Squad DDP test (a module of its own: the spawned processes import
only torch and the adapter, not the test module's heavier imports)."""

from __future__ import annotations

import torch

from mtl.models.adapters.modsquad import TaskGate
from mtl.models.adapters.routing import all_reduce_sum
from mtl.models.adapters.task_batch import TaskBatch


def gate_gradients(rows: torch.Tensor, sync: bool) -> torch.Tensor:
    """Gradient of the summed MI terms of a seeded gate with respect to its task weights,
    for the task batch `rows` (T x n x C) of this process."""
    torch.manual_seed(0)
    batch = TaskBatch(["a", "b"])
    gate = TaskGate(4, 6, 2, ["a", "b"], batch, mi_weight=1.0, sync_statistics=sync).train()
    with torch.no_grad():
        for p in gate.moe_gate.values():
            p.normal_()
    with batch.run(["a", "b"], rows.shape[1]):
        gate(rows)
    sum(gate.balance_loss.values()).backward()
    return torch.stack([gate.moe_gate["a"].grad, gate.moe_gate["b"].grad])


def ddp_worker(rank: int, init: str, rows: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    half = rows[:, rank * 5 : (rank + 1) * 5]  # this process's share of every task's tokens
    grads = {}
    for sync in (True, False):
        g = gate_gradients(half, sync)
        dist.all_reduce(g)  # what DDP does with the gradients: their mean
        grads[sync] = g / 2
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def all_reduce_worker(rank: int, init: str) -> None:
    """Sums a per-process tensor with `all_reduce_sum` and back-propagates through the sum: the
    value is the sum over processes and each input's gradient the sum of every process's upstream
    gradient (every process's loss uses the summed statistics). Then the process group must be
    released by `destroy_process_group`: a group kept alive past it still runs its threads when
    the interpreter exits, and the process aborts (SIGABRT) although its work is done."""
    import gc
    import weakref

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    group = weakref.ref(dist.group.WORLD)
    x = (torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)).requires_grad_(True)
    total = all_reduce_sum(x)
    (total * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    torch.testing.assert_close(total.detach(), torch.tensor([3.0, 6.0, 9.0]))
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 20.0, 200.0]))
    del total
    dist.destroy_process_group()
    gc.collect()
    assert group() is None, "the process group outlived destroy_process_group"
