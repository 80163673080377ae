"""The W&B side of a run: a stable run id kept in the run directory, panel summaries, finishing.

A run directory holds its W&B run id in ``wandb_run_id.txt``; a run resumed from a checkpoint
continues the W&B run of the directory the checkpoint belongs to (`run_id`).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from mtl.tasks import TASKS

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


def metric_summaries(tasks: Sequence[str], stages: Sequence[str] = ("val", "test")) -> dict:
    """``{key: "max" | "min"}`` for every score of `tasks`, from the registry's directions, plus
    the losses (min) and Δm (max)."""
    summaries: dict[str, str] = {}
    for stage in stages:
        summaries[f"{stage}/loss"] = "min"
        summaries[f"{stage}/delta_m"] = "max"
        for task in tasks:
            summaries[f"{stage}/{task}/loss"] = "min"
            for metric, higher in TASKS[task].higher_is_better.items():
                summaries[f"{stage}/{task}/{metric}"] = "max" if higher else "min"
    return summaries


def define_metrics(experiment, tasks: Sequence[str], step_metric: str = "trainer/global_step"):
    """Tell W&B the best value of each score (summary max or min) so run tables and panels show
    the best epoch rather than the last one."""
    for key, summary in metric_summaries(tasks).items():
        experiment.define_metric(key, summary=summary, step_metric=step_metric)


def finish(failed: bool = False) -> None:
    """End the current W&B run, if any, so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
