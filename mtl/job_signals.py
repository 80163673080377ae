"""Helper processes (loader workers, the edge-matching pool) and the job's stop signals.

A scheduler's SIGTERM (SLURM at a time limit or preemption, ``timeout``) and a terminal's Ctrl+C
(SIGINT) reach every process of the job. A helper killed by one makes its parent fail (PyTorch
raises "DataLoader worker ... is killed by signal", a process pool breaks) before the training
process can finish its step and save. Helpers therefore ignore both signals; the training process
handles them (`mtl.callbacks.SignalCheckpoint`) and ends its helpers itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def ignore_job_signals() -> None:
    """In a helper process: leave SIGTERM and SIGINT to the process that started it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pool_worker_init() -> None:
    """Initializer of a process pool's workers: `ignore_job_signals`, and exit when the parent
    is gone. A pool worker waits on its task queue for ever once its parent has died (PyTorch's
    loader workers watch their parent themselves); without the job's signals to end it, it would
    outlive the job."""
    ignore_job_signals()
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()
