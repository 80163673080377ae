"""Training progress as log lines, for runs whose output goes to a file (SLURM, nohup, CI).

Lightning's progress bars redraw one terminal line; written to a file they are one unreadable
line or nothing at all until the run ends. `ProgressLog` logs plain lines through Python
logging instead, so they also land in Hydra's ``train.log``:

    epoch 2/8, batch 120/400, step 520/3200, loss 1.2345, lr 8.12e-04, 45.2 samples/s, ETA 0:12:34
    epoch 2/8 done, step 800/3200, loss 1.1802, val/loss 1.0721, lr 7.9e-04, ..., ETA 0:10:02

No Lightning callback logs progress without a progress bar, hence this one.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Any

import lightning as L
import torch

from mtl.console import stdout_is_terminal

log = logging.getLogger(__name__)


class ProgressLog(L.Callback):
    """One log line per training epoch, and within an epoch every `every_n_steps` optimiser
    steps or every `every_n_seconds` seconds, whichever comes first.

    Each line has the epoch, the batch in the epoch, the optimiser step of the whole fit, the mean
    training loss since the previous line, the learning rate, the training throughput (samples
    per second over all processes, validation time left out) and the estimated time to the end
    of the fit (from the wall time per step so far, validation included). Epoch lines add the
    validation loss. Only the first process logs.

    Args:
        enable: ``auto`` (when stdout is not a terminal or the progress bar is off), true, false.
        every_n_steps: a line every N optimiser steps within an epoch (0: off).
        every_n_seconds: a line when this many seconds have passed since the last (0: off).
    """

    def __init__(
        self, enable: bool | str = "auto", every_n_steps: int = 0, every_n_seconds: float = 60.0
    ) -> None:
        if enable not in ("auto", True, False):
            raise ValueError(f"callbacks.progress.enable: {enable!r}; expected auto, true, false")
        if every_n_steps < 0 or every_n_seconds < 0:
            raise ValueError("callbacks.progress: every_n_steps and every_n_seconds must be >= 0")
        self.enable = enable
        self.every_n_steps = int(every_n_steps)
        self.every_n_seconds = float(every_n_seconds)
        self.active = False

    # ---------------------------------------------------------------- state
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enable == "auto":
            self.active = not stdout_is_terminal() or trainer.progress_bar_callback is None
        else:
            self.active = bool(self.enable)
        self.active = self.active and trainer.is_global_zero
        now = time.monotonic()
        self._start, self._start_step = now, trainer.global_step
        self._validation_time = 0.0
        self._reset_interval(now)
        self.on_train_epoch_start(trainer, pl_module)  # not called when resuming mid-epoch

    def _reset_interval(self, now: float) -> None:
        self._last = now
        self._samples = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._interval_validation = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_loss_sum: torch.Tensor | float = 0.0
        self._epoch_loss_count = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_started = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not hasattr(self, "_last"):
            return
        spent = time.monotonic() - self._validation_started
        self._interval_validation += spent
        self._validation_time += spent

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.active:
            return
        self._samples += _batch_size(batch) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # summed on the device: no synchronisation per step
            self._loss_sum = self._loss_sum + loss.detach().float()
            self._epoch_loss_sum = self._epoch_loss_sum + loss.detach().float()
            self._loss_count += 1
            self._epoch_loss_count += 1
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch line follows
        now = time.monotonic()
        step = trainer.global_step
        due_steps = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        due_time = self.every_n_seconds and now - self._last >= self.every_n_seconds
        if due_steps or due_time:
            where = f"batch {batch_idx + 1}/{_count(trainer.num_training_batches)}"
            self._report(trainer, now, where, self._loss_sum, self._loss_count)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        val_loss = trainer.callback_metrics.get("val/loss")
        extra = f"val/loss {float(val_loss):.4f}" if val_loss is not None else None
        now = time.monotonic()
        self._report(trainer, now, None, self._epoch_loss_sum, self._epoch_loss_count, extra)

    # ---------------------------------------------------------------- the line
    def _report(
        self,
        trainer: L.Trainer,
        now: float,
        where: str | None,
        loss_sum: torch.Tensor | float,
        loss_count: int,
        extra: str | None = None,
    ) -> None:
        """One line; `where` is the batch in the epoch (None: the epoch is done)."""
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        epoch = f"epoch {trainer.current_epoch + 1}/{_count(trainer.max_epochs)}"
        parts = [epoch, where] if where else [f"{epoch} done"]
        parts.append(f"step {step}/{_count(total)}")
        if loss_count:
            parts.append(f"loss {float(loss_sum) / loss_count:.4f}")
        if extra:
            parts.append(extra)
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        training_time = now - self._last - self._interval_validation
        if self._samples and training_time > 0:
            parts.append(f"{self._samples / training_time:.1f} samples/s")
        done = step - self._start_step
        if done > 0 and math.isfinite(total):
            remaining = (now - self._start) / done * max(total - step, 0)
            parts.append(f"ETA {_duration(remaining)}")
        log.info(", ".join(parts))
        self._reset_interval(now)


def _batch_size(batch: Any) -> int:
    image = batch.get("image") if isinstance(batch, dict) else None
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


def _count(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value >= 0 else "?"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
