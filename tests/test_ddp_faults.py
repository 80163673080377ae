"""Bad data under DDP, run as a user runs it: ``python train.py trainer=ddp_cpu`` (2 CPU processes,
gloo). Every process takes the same decision: a batch left empty by ``data.skip_bad=true`` on
one process skips the update on all of them; a bad sample without it stops every process with
the one data error, and no process is left behind."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtl.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
# 10 scenes per split: the setup check of 8 evenly spaced samples misses scene 2, damaged below;
# a global batch of 2 is one sample per process, so that sample's batch is empty on its process.
SIZE = ["data.generate.n_train=10", "data.generate.n_val=10", "data.image_size=[48,64]"]
pytestmark = pytest.mark.slow


def _damaged_scenes(tmp_path: Path, bad: str) -> Path:
    root = generate(tmp_path / "scenes", n_train=10, n_val=10, size=(48, 64))
    depth = root / "depth" / f"{bad}.npy"
    depth.write_bytes(depth.read_bytes()[:-100])  # truncated
    return root


def _train(tmp_path: Path, bad: str, *overrides: str) -> subprocess.CompletedProcess:
    """``train.py`` on scenes whose sample `bad` is damaged, in its own session; fails when a
    process of it outlives the command."""
    root = _damaged_scenes(tmp_path, bad)
    command = [
        sys.executable, "train.py", "trainer=ddp_cpu", *SIZE, f"data.root={root}",
        "data.tasks=[semseg,depth]", "data.batch_size=2", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "diagnostics_every_n_steps=0",
        "model.decoder.hidden_channels=8", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=400)
    finally:
        process.kill()
    left = _session_left(process.pid)
    assert not left, f"a process outlived the command:\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _session_left(session: int, grace_s: float = 10.0) -> bool:
    """Whether a process of `session` is still there after `grace_s` (then it is killed)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            os.killpg(session, signal.SIGKILL)
            return True
        time.sleep(0.5)


def test_an_empty_batch_on_one_process_skips_that_update_on_every_process(tmp_path):
    result = _train(tmp_path, "train_00002", "data.skip_bad=true")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr  # the log goes to stdout
    skipped = "skipping a bad sample (data.skip_bad=true): synthetic scenes sample 'train_00002'"
    assert skipped in output
    assert "no process updates the model this step" in output
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4  # 5 steps, the one with the empty batch skipped
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("data/skipped")]
    assert [float(r["data/skipped"]) for r in rows] == [1.0]


@pytest.mark.parametrize("bad", ["train_00002", "val_00002"])
def test_a_bad_sample_on_one_process_stops_every_process_with_the_data_error(tmp_path, bad):
    """In training the processes agree at the step; in validation, where the processes may
    hold different numbers of batches, at the end of the epoch (here the first one's)."""
    one_step = ["+trainer.limit_train_batches=1"] if bad.startswith("val") else []
    result = _train(tmp_path, bad, *one_step)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    path = tmp_path / "scenes" / "depth" / f"{bad}.npy"
    assert len(errors) == 2, result.stderr[-3000:]  # one per process
    for error in errors:
        expected = f"error: synthetic scenes sample '{bad}': cannot read .npy file: {path}"
        assert error.startswith(expected)
    assert "Traceback" not in result.stderr
