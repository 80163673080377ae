"""A resumed run keeps its history: the CSV and TensorBoard logs of every launch, each step once."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
from omegaconf import open_dict

from mtl.checkpoint import load_checkpoint
from mtl.config import ConfigError
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


def test_resume_in_the_same_directory_keeps_every_csv_row_once(make_cfg, tmp_path, recwarn):
    run = tmp_path / "a"
    train(make_cfg(*SMALL, "trainer.max_epochs=2", "resume=auto", output_dir=run))
    first = _rows(run)
    assert _steps(first, "train/loss") == list(range(2 * STEPS_PER_EPOCH))

    recwarn.clear()
    train(make_cfg(*SMALL, "trainer.max_epochs=3", "resume=auto", output_dir=run))
    # the folder holds the run's own checkpoints: no warning that it is not empty
    assert not [w for w in recwarn if "not empty" in str(w.message)]
    rows = _rows(run)
    assert _steps(rows, "train/loss") == list(range(3 * STEPS_PER_EPOCH))
    assert _steps(rows, "lr-AdamW") == list(range(3 * STEPS_PER_EPOCH))
    # one validation row per epoch, plus the final evaluation of the best checkpoint
    assert _epochs(rows, "val/semseg/mIoU")[:3] == [0, 1, 2]
    # the rows of the first launch are kept as they were
    old = [r for r in first if r.get("train/loss")]
    new = {r["step"]: r["train/loss"] for r in rows if r.get("train/loss")}
    assert all(new[r["step"]] == r["train/loss"] for r in old)


class CrashAtStep(L.Callback):
    """Raises at the start of the batch after global step `step` (a crash after a checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return sorted(e.step for e in events.Scalars(tag))


def test_resume_after_a_crash_drops_rows_logged_after_the_checkpoint(make_cfg, tmp_path):
    run = tmp_path / "a"
    overrides = (*SMALL, "trainer.max_epochs=2", "logger=[csv,tensorboard]")
    crashing = make_cfg(*overrides, "ckpt_every_n_steps=4", output_dir=run)
    with open_dict(crashing):  # last.ckpt after the 4th step; the 5th is logged, then a crash
        crashing.callbacks["crash"] = {"_target_": f"{__name__}.CrashAtStep", "step": 5}
    with pytest.raises(RuntimeError, match="crash"):
        train(crashing)
    assert _steps(_rows(run), "train/loss") == [0, 1, 2, 3, 4]
    assert _tensorboard_steps(run, "train/loss") == [0, 1, 2, 3, 4]

    train(make_cfg(*overrides, "resume=auto", output_dir=run))  # logs the 5th step again
    rows = _rows(run)
    assert _steps(rows, "train/loss") == list(range(2 * STEPS_PER_EPOCH))
    assert _epochs(rows, "val/semseg/mIoU")[:2] == [0, 1]
    assert _tensorboard_steps(run, "train/loss") == list(range(2 * STEPS_PER_EPOCH))
    assert [p.name for p in (run / "tensorboard").iterdir() if p.is_dir()] == []  # no versions


def _poly(step: int, total: int, warmup: int, base: float = 1e-3, power: float = 0.9) -> float:
    """`mtl.optim.warmup_poly` by hand: linear from 1% over `warmup` steps, then poly to 0."""
    if step < warmup:
        return base * (0.01 + 0.99 * step / warmup)
    return base * (1 - (step - warmup) / (total - warmup)) ** power


def test_resume_with_more_epochs_extends_the_learning_rate_schedule(make_cfg, tmp_path, caplog):
    run = tmp_path / "a"
    overrides = (*SMALL, "optim.scheduler.warmup_steps=2")
    train(make_cfg(*overrides, "trainer.max_epochs=2", output_dir=run))
    with caplog.at_level(logging.INFO, logger="mtl"):
        train(make_cfg(*overrides, "trainer.max_epochs=3", "resume=auto", output_dir=run))

    lrs = {int(r["step"]): float(r["lr-AdamW"]) for r in _rows(run) if r.get("lr-AdamW")}
    for step in range(6, 9):  # the steps added by the resumed launch, on the 9-step schedule
        assert lrs[step] > 0
        assert lrs[step] == pytest.approx(_poly(step, total=9, warmup=2), rel=1e-6)
    for step in range(6):  # the first launch's steps, on its 6-step schedule
        assert lrs[step] == pytest.approx(_poly(step, total=6, warmup=2), rel=1e-6)
    assert "learning-rate schedule extended from 6 to 9 steps" in caplog.text


def test_keeping_only_the_last_checkpoint_saves_it_after_every_epoch(make_cfg, tmp_path):
    run = tmp_path / "a"
    overrides = (*SMALL, "trainer.max_epochs=2", "callbacks.model_checkpoint.save_top_k=0")
    crashing = make_cfg(*overrides, output_dir=run)
    with open_dict(crashing):  # a crash in the second epoch: resume from the end of the first
        crashing.callbacks["crash"] = {"_target_": f"{__name__}.CrashAtStep", "step": 4}
    with pytest.raises(RuntimeError, match="crash"):
        train(crashing)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH

    train(make_cfg(*overrides, "resume=auto", output_dir=run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert _steps(_rows(run), "train/loss") == list(range(2 * STEPS_PER_EPOCH))


def test_resume_into_a_new_directory_copies_the_history_and_leaves_the_old_run(
    make_cfg, tmp_path, caplog, recwarn
):
    old, new = tmp_path / "a", tmp_path / "b"
    train(make_cfg(*SMALL, "trainer.max_epochs=2", output_dir=old))
    before = (old / "csv" / "metrics.csv").read_bytes()
    last = old / "checkpoints" / "last.ckpt"
    recwarn.clear()
    with caplog.at_level(logging.INFO, logger="mtl.checkpoint"):
        train(make_cfg(*SMALL, "trainer.max_epochs=3", f"ckpt_path={last}", output_dir=new))

    # an everyday continuation: one line saying so, no warning about the earlier run's files
    assert f"continuing the run of {old / 'checkpoints'}" in caplog.text
    assert "WARNING" not in caplog.text
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    saved = sorted(p.name for p in (new / "checkpoints").iterdir())
    assert saved == ["epoch_002.ckpt", "last.ckpt"]

    assert (old / "csv" / "metrics.csv").read_bytes() == before
    assert load_checkpoint(last)["global_step"] == 2 * STEPS_PER_EPOCH  # not overwritten
    rows = _rows(new)
    assert _steps(rows, "train/loss") == list(range(3 * STEPS_PER_EPOCH))
    assert _epochs(rows, "val/semseg/mIoU")[:3] == [0, 1, 2]


def test_a_schedule_without_a_run_length_is_a_config_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=-1 set \+trainer.max_steps=N"):
        train(make_cfg(*SMALL, "trainer.max_epochs=-1"))


def test_a_run_directory_given_as_output_dir_holds_the_log_of_every_launch(tmp_path):
    """``python train.py paths.output_dir=runs/a resume=auto``, launched twice from a fresh
    folder as the README shows it: ``runs/a`` gets the log and Hydra's record of both launches
    (no second folder under ``outputs/``)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    tiny = [*(s for s in SMALL if not s.startswith("diagnostics")), "data.num_workers=0"]
    tiny += ["data.generate.n_train=12", "data.generate.n_val=4", "data.image_size=[48,64]"]
    tiny += ["data.batch_size=4"]
    for epochs in (1, 2):
        command = [sys.executable, str(root / "train.py"), "paths.output_dir=runs/a"]
        command += ["resume=auto", f"trainer.max_epochs={epochs}", *tiny]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "runs" / "a"
    log = (run / "train.log").read_text()
    assert log.count("Final validation scores") == 2  # both launches, appended
    assert "resuming from" in log
    assert (run / ".hydra" / "overrides.yaml").exists()
    assert not (tmp_path / "outputs").exists()
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
