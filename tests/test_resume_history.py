"""A resumed run keeps its history: the CSV and TensorBoard logs of every launch, each step once."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from omegaconf import open_dict

from mtl.train import train

# timm's test ResNet, two tasks, narrow heads; 3 training batches per epoch, one validation batch,
# every step logged
SMALL = (
    "model.backbone.name=test_resnet",
    "data.tasks=[semseg,depth]",
    "model.decoder.hidden_channels=16",
    "trainer.num_sanity_val_steps=0",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "diagnostics_every_n_steps=0",
)
STEPS_PER_EPOCH = 3


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _steps(rows: list[dict[str, str]], key: str) -> list[int]:
    return sorted(int(r["step"]) for r in rows if r.get(key))


def _epochs(rows: list[dict[str, str]], key: str) -> list[int]:
    return sorted(int(r["epoch"]) for r in rows if r.get(key))


def test_resume_in_the_same_directory_keeps_every_csv_row_once(make_cfg, tmp_path):
    run = tmp_path / "a"
    train(make_cfg(*SMALL, "trainer.max_epochs=2", "resume=auto", output_dir=run))
    first = _rows(run)
    assert _steps(first, "train/loss") == list(range(2 * STEPS_PER_EPOCH))

    train(make_cfg(*SMALL, "trainer.max_epochs=3", "resume=auto", output_dir=run))
    rows = _rows(run)
    assert _steps(rows, "train/loss") == list(range(3 * STEPS_PER_EPOCH))
    assert _steps(rows, "lr-AdamW") == list(range(3 * STEPS_PER_EPOCH))
    # one validation row per epoch, plus the final evaluation of the best checkpoint
    assert _epochs(rows, "val/semseg/mIoU")[:3] == [0, 1, 2]
    # the rows of the first launch are kept as they were
    old = [r for r in first if r.get("train/loss")]
    new = {r["step"]: r["train/loss"] for r in rows if r.get("train/loss")}
    assert all(new[r["step"]] == r["train/loss"] for r in old)
