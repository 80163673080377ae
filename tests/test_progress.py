"""Progress as log lines when the output goes to a file or a pipe (SLURM, nohup, CI)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtl.callbacks import ProgressLog

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.generate.n_train=16",
    "data.generate.n_val=8",
    "data.image_size=[48,64]",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.backbone.name=test_resnet",
    "data.tasks=[semseg,depth]",
    "model.decoder.hidden_channels=16",
    "trainer.num_sanity_val_steps=0",
    "diagnostics_every_n_steps=0",
]
NUMBER = r"([0-9.e+-]+)"
STEP_LINE = re.compile(
    rf"epoch (\d)/2, batch (\d)/3, step (\d)/6, loss {NUMBER}, lr {NUMBER}, "
    rf"{NUMBER} samples/s, ETA \d+:\d\d:\d\d$"
)
EPOCH_LINE = re.compile(
    rf"epoch (\d)/2 done, step (\d)/6, loss {NUMBER}, val/loss {NUMBER}, lr {NUMBER}, "
    rf"{NUMBER} samples/s, ETA \d+:\d\d:\d\d$"
)


def _matches(pattern: re.Pattern, text: str) -> list[tuple[str, ...]]:
    return [m.groups() for line in text.splitlines() if (m := pattern.search(line))]


def test_progress_is_logged_to_a_pipe_and_to_train_log(tiny_data_root, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        f"data.root={tiny_data_root}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "callbacks.progress.every_n_steps=2",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for text in (done.stdout, (run / "train.log").read_text()):
        steps = _matches(STEP_LINE, text)
        # every 2 steps, except at an epoch's last batch (the epoch line follows)
        assert [s[:3] for s in steps] == [("1", "2", "2"), ("2", "1", "4")], text[-3000:]
        epochs = _matches(EPOCH_LINE, text)
        assert [e[:2] for e in epochs] == [("1", "3"), ("2", "6")], text[-3000:]
        assert all(float(e[-1]) > 0 for e in epochs)  # samples/s
        assert float(epochs[0][4]) > 0 and float(epochs[1][4]) == 0  # lr: 0 at the schedule's end

    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    for epoch, line in enumerate(epochs):  # the mean training loss of the epoch
        losses = [float(r["train/loss"]) for r in rows if int(r["epoch"]) == epoch]
        assert len(losses) == 3
        assert float(line[2]) == pytest.approx(sum(losses) / 3, abs=1e-4)


@pytest.mark.parametrize(
    ("enable", "terminal", "bar", "active"),
    [
        ("auto", True, True, False),  # a terminal shows the progress bar
        ("auto", False, True, True),  # a pipe or a file
        ("auto", True, False, True),  # no progress bar
        (True, True, True, True),
        (False, False, False, False),
    ],
)
def test_progress_lines_are_on_when_no_progress_bar_is_seen(
    monkeypatch, enable, terminal, bar, active
):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
    trainer = SimpleNamespace(progress_bar_callback=object() if bar else None, is_global_zero=True)
    trainer.global_step = 0
    callback = ProgressLog(enable=enable)
    callback.on_train_start(trainer, None)
    assert callback.active is active
