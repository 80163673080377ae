"""What a default run prints and writes to ``train.log``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from conftest import TINY_DATA
from lightning.fabric.utilities.warnings import PossibleUserWarning

from mtl.console import quiet_console

ROOT = Path(__file__).resolve().parents[1]


def test_debug_run_console_has_no_noise_and_train_log_has_the_scores(tmp_path):
    # data.pin_memory=true as in the NYUD and PASCAL configs, on this CPU-only machine
    command = [sys.executable, str(ROOT / "train.py"), "debug=fdr", *TINY_DATA]
    command.append("data.pin_memory=true")
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-5000:]
    noises = ("FLOPs", "Tip:", "litlogger", "pin_memory", "does not have many workers", "LeafSpec")
    for noise in noises:
        assert noise not in console, noise
    assert "it/s" not in console  # output to a pipe: progress as log lines, no bar frames
    assert "Total params" in console  # the model summary itself is still there
    (log_file,) = (tmp_path / "outputs" / "train" / "runs").glob("*/train.log")
    text = log_file.read_text()
    assert "Final validation scores" in text
    rows = [line for line in text.splitlines() if "semseg" in line and "mIoU" in line]
    assert len(rows) == 1 and "higher" in rows[0]
    assert "\x1b[" not in text  # plain text, no colour codes


def _deprecated_call() -> None:
    warnings.warn("old_api is deprecated", FutureWarning, stacklevel=1)


def test_warnings_are_filtered_and_each_deprecation_shown_once():
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")  # Python's action for FutureWarning
        quiet_console()
        for _ in range(3):
            _deprecated_call()
            warnings.filterwarnings("ignore", message="unrelated")  # as Lightning does
        warnings.warn(
            "The 'train_dataloader' does not have many workers which may be a bottleneck.",
            PossibleUserWarning,
            stacklevel=1,
        )
        warnings.warn("a warning that matters", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["old_api is deprecated", "a warning that matters"]


def test_lightning_tips_are_dropped_other_info_kept(caplog):
    quiet_console()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
