"""The debug configs do what their files say."""

from __future__ import annotations

import csv

from mtl.train import train


def _train_losses(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_overfit_drives_the_loss_of_its_batches_down_quickly(make_cfg, tmp_path):
    train(make_cfg("debug=overfit", output_dir=tmp_path / "run"))
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 150, "one logged loss per step: 75 epochs of 2 batches"
    # the same two batches every step, no augmentation, no warm-up: down to about a tenth
    assert losses[-1] < 0.12 * losses[0], (losses[0], losses[-1])


def test_fast_dev_run_writes_no_checkpoint(make_cfg, tmp_path):
    train(make_cfg("debug=fdr", output_dir=tmp_path / "run"))
    assert not list((tmp_path / "run").rglob("*.ckpt"))
