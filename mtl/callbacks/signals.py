"""Save a checkpoint when the job is told to stop (SIGTERM from a scheduler, SIGINT / Ctrl+C).

Lightning's own SIGTERM handling stops training without saving, and Ctrl+C raises
KeyboardInterrupt wherever the program happens to be. This callback replaces the SIGTERM and
SIGINT handlers when training starts (after Lightning has installed its own), only records the
signal, and at the end of the next training step, a point from which Lightning's loops resume
exactly, saves ``last.ckpt`` on every process together and raises `TrainingInterrupted`. The
previous handlers come back when training ends. SIGUSR1 (Lightning's SLURM auto-requeue, which
saves an ``hpc_ckpt`` and requeues) is left alone.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `path`; the process should exit non-zero."""

    def __init__(self, signum: int, path: str) -> None:
        self.signum, self.path = signum, path
        super().__init__(f"saved checkpoint {path} after signal {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by the signal (128 + number)."""
        return 128 + self.signum


class SignalCheckpoint(L.Callback):
    """On SIGTERM / SIGINT: save ``<dirpath>/<filename>`` at the next step end, then stop.

    Args:
        dirpath: where to save (None: the ModelCheckpoint callback's directory, else
            ``<default_root_dir>/checkpoints``).
        filename: the file name; ``last.ckpt`` so that ``ckpt_path=last`` / ``resume=auto`` find it.
        signals: names of the signals to handle.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last.ckpt",
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGINT"),
    ) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.signals = [signal.Signals[name] for name in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    # ---------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now, without saving
        self.received = signum
        log.info("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                self._previous.clear()
                return

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # ---------------------------------------------------------------- saving
    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        dirpath = self.dirpath
        if dirpath is None and trainer.checkpoint_callback is not None:
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is None:
            dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return Path(dirpath) / self.filename

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        received = self.received is not None
        if trainer.world_size > 1:  # a signal on any process stops all of them, together
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum = self.received if self.received is not None else int(signal.SIGTERM)
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        log.warning("saved checkpoint %s after signal %s", path, name)
        self._restore()
        trainer.should_stop = True
        raise TrainingInterrupted(signum, str(path))
