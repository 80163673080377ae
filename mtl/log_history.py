"""Logs that continue across resumes: one CSV file and one TensorBoard folder per run directory.

Lightning's `CSVLogger` deletes an existing ``metrics.csv`` when it starts, and a resumed
TensorBoard run adds a second copy of the steps trained after the checkpoint. A resumed fit
should instead read as one run: every step once, the rows of each launch up to the checkpoint
kept, those logged after it (a kill after the checkpoint) dropped; a run resumed into another
directory starts its ``metrics.csv`` with the rows of the run it continues. Lightning has no
hook for this, hence `ResumableCSVLogger` and the `LogHistory` callback. The files are local
(the run directory), read and written with plain ``open``.

Steps are Lightning's logging step (``_batches_that_stepped``): the checkpoint stores the value
of its last logged step B, and the resumed fit logs from B + 1 on.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mtl.checkpoint import CONFIG_KEY

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that appends to an existing ``metrics.csv`` instead of deleting
    it, keeping its columns."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if Path(self.metrics_file_path).is_file():
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the previous metrics.csv
        pass

    def keep_until(self, step: int) -> int:
        """Drop the rows logged after `step`; returns how many were dropped."""
        self.save()
        rows = _read(self.metrics_file_path)
        kept = [row for row in rows if _step(row) <= step]
        if len(kept) < len(rows):
            self._write(kept)
        return len(rows) - len(kept)

    def start_from(self, path: Path, step: int) -> int:
        """Begin an empty ``metrics.csv`` with the rows of `path` logged up to `step` (the run
        this one resumes, in another directory); returns how many rows were copied."""
        self.save()
        if _read(self.metrics_file_path) or not path.is_file():
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if _step(row) <= step]
            self.metrics_keys = sorted(set(self.metrics_keys) | set(reader.fieldnames or []))
        self._write(rows)
        return len(rows)

    def _write(self, rows: list[dict[str, str]]) -> None:
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


def _read(path: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _step(row: dict[str, str]) -> int:
    try:
        return int(float(row.get("step") or -1))
    except ValueError:
        return -1


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose ``metrics.csv`` holds every launch of a run (see `LogHistory`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / _AppendingWriter.NAME_METRICS_FILE

    @rank_zero_only
    def keep_until(self, step: int) -> int:
        """Drop the rows logged after `step` (-1: all); returns how many were dropped."""
        return self.experiment.keep_until(step)

    @rank_zero_only
    def start_from(self, path: Path, step: int) -> int:
        """Begin an empty file with the rows of `path` logged up to `step`."""
        return self.experiment.start_from(path, step)


def _purge_tensorboard(logger: TensorBoardLogger, step: int) -> None:
    """Tell TensorBoard to discard the events of earlier launches logged after `step`: a
    ``SessionLog.START`` event at step + 1, what ``SummaryWriter(purge_step=...)`` writes when
    it opens a file (the writer exists by now: the hyperparameters are logged before the fit)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    except ImportError:  # Lightning falls back to tensorboardX without tensorboard
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    writer = logger.experiment._get_file_writer()
    writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))
    writer.flush()


def previous_csv(checkpoint: dict[str, Any]) -> Path | None:
    """The ``metrics.csv`` of the run that saved `checkpoint`, from the config stored in it."""
    node = ((checkpoint.get(CONFIG_KEY) or {}).get("logger") or {}).get("csv") or {}
    if not node.get("save_dir") or not isinstance(node.get("version"), str):
        return None
    return Path(node["save_dir"]) / (node.get("name") or "") / node["version"] / "metrics.csv"


def resume_step(checkpoint: dict[str, Any]) -> int:
    """The last logging step before `checkpoint` was saved (-1 for one saved before any)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", 0)) - 1 + _saved_after_step(checkpoint)


def _saved_after_step(checkpoint: dict[str, Any]) -> int:
    """1 when the checkpoint was saved after a training step but before Lightning counted it
    (``on_train_batch_end``, or after the validation that ends an epoch): Lightning's loop then
    counts it on restore, as `_batches_that_stepped` + 1 (its ``reset``)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {})
    batch = progress.get("epoch_loop.batch_progress", {}).get("total", {})
    return int(batch.get("processed", 0) > 0 and batch.get("processed") != batch.get("completed"))


class LogHistory(L.Callback):
    """When training starts (after every restore), cut the CSV and TensorBoard logs of the run
    back to the checkpoint it resumes from (to nothing when it starts from scratch)."""

    def __init__(self) -> None:
        self.step, self.previous_csv = -1, None

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.step, self.previous_csv = resume_step(checkpoint), previous_csv(checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, previous = self.step, self.previous_csv
        self.step, self.previous_csv = -1, None
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                _continue_csv(logger, step, previous)
            elif isinstance(logger, TensorBoardLogger):
                _purge_tensorboard(logger, step)


def _continue_csv(logger: ResumableCSVLogger, step: int, previous: Path | None) -> None:
    if dropped := logger.keep_until(step):
        after = f"after step {step}, the checkpoint's" if step >= 0 else "by an earlier launch"
        log.info("%s: dropped %d row(s) logged %s", logger.metrics_file, dropped, after)
    if previous is None or previous.resolve() == logger.metrics_file.resolve():
        return
    if copied := logger.start_from(previous, step):
        log.info("%s: %d row(s) from %s", logger.metrics_file, copied, previous)


def history_callbacks(loggers: list[Logger]) -> list[L.Callback]:
    """`LogHistory` when a CSV or TensorBoard logger writes into the run directory."""
    if any(isinstance(lg, (ResumableCSVLogger, TensorBoardLogger)) for lg in loggers):
        return [LogHistory()]
    return []
