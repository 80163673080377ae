"""The W&B side of a run: a stable run id kept in the run directory, the run summary, finishing.

A run directory holds its W&B run id in ``wandb_run_id.txt``; a run resumed from a checkpoint
continues the W&B run of the directory the checkpoint belongs to (`run_id`).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

#: File in a run directory that holds the run's W&B id.
RUN_ID_FILE = "wandb_run_id.txt"


def read_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id stored in `run_dir` (None: none stored)."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def checkpoint_run_dir(ckpt_path: str | Path) -> Path | None:
    """The run directory of a checkpoint: the nearest of its two parent folders that holds a
    W&B id (``<run>/checkpoints/last.ckpt`` and ``<run>/last.ckpt`` both work)."""
    for folder in list(Path(ckpt_path).resolve().parents)[:2]:
        if (folder / RUN_ID_FILE).is_file():
            return folder
    return None


def run_id(run_dir: str | Path, ckpt_path: str | Path | None = None) -> str:
    """The W&B run id of the run in `run_dir`: the one stored there, else the one of the run
    `ckpt_path` resumes, else a new one. Rank zero stores it in `run_dir`, so a restarted or
    requeued job (same directory) and a resumed run continue the same W&B run."""
    found = read_run_id(run_dir)
    if found is None and ckpt_path and Path(ckpt_path).is_file():
        source = checkpoint_run_dir(ckpt_path)
        found = read_run_id(source) if source is not None else None
    found = found or uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    if rank_zero_only.rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / RUN_ID_FILE).write_text(found + "\n")
    return found


class EvaluationSummary(L.Callback):
    """Puts the scores of a stand-alone evaluation (the re-validation of the evaluated
    checkpoint after a fit, or ``train=false``) into the W&B run summary instead of the run's
    history, so they are not one more epoch in the panels, and every score in the run table is
    that of the evaluated checkpoint (W&B's default summary, the last value logged, holds
    until then). The summary's ``evaluated_checkpoint`` names the checkpoint file.

    The W&B loggers are taken off the trainer while the evaluation runs and given back in
    ``teardown``, after every evaluation hook, with the scores.
    """

    def __init__(self) -> None:
        self._all: list[Logger] = []
        self._hidden: list[WandbLogger] = []

    def _hide(self, trainer: L.Trainer) -> None:
        if trainer.state.fn not in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            return
        self._all = list(trainer.loggers)
        self._hidden = [lg for lg in self._all if isinstance(lg, WandbLogger)]
        if self._hidden:
            trainer.loggers = [lg for lg in self._all if lg not in self._hidden]

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._hide(trainer)

    def on_test_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._hide(trainer)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if not self._hidden:
            return
        hidden, self._hidden = self._hidden, []
        trainer.loggers = self._all
        if not trainer.is_global_zero:
            return
        summary: dict[str, float | str] = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(("val/", "test/"))
        }
        if trainer.ckpt_path:
            summary["evaluated_checkpoint"] = Path(trainer.ckpt_path).name
        for logger in hidden:
            logger.experiment.summary.update(summary)


def finish(failed: bool = False) -> None:
    """End the current W&B run, if any, so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
