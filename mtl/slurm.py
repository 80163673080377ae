"""Lightning's SLURM cluster environment, built from config (``conf/trainer/slurm.yaml``)."""

from __future__ import annotations

import signal

from lightning.pytorch.plugins.environments import SLURMEnvironment


def slurm_environment(
    auto_requeue: bool = True, requeue_signal: str = "SIGUSR1"
) -> SLURMEnvironment:
    """`SLURMEnvironment` that saves a checkpoint and requeues the job when SLURM sends
    `requeue_signal` (a name such as ``SIGUSR1``; ask SLURM for it with ``--signal``)."""
    try:
        sig = signal.Signals[requeue_signal]
    except KeyError:
        raise ValueError(
            f"trainer.plugins: requeue_signal {requeue_signal!r} is not a signal name "
            "such as SIGUSR1"
        ) from None
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=sig)
