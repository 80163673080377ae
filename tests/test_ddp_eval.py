"""Validation under DDP scores every image exactly once: 2 CPU processes (gloo) on an odd number
of images give the scores of 1 process (a padding sampler would score one image twice)."""

from __future__ import annotations

import lightning as L
import pytest

from mtl.metrics.callback import MetricsCallback
from mtl.train import build_datamodule, build_module


def _validate(quiet_trainer, cfg, devices: int) -> dict[str, float]:
    L.seed_everything(cfg.seed)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    trainer = quiet_trainer(cfg, devices, callbacks=[MetricsCallback()])
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in results[0].items()}


def test_two_process_validation_on_an_odd_split_equals_one_process(
    make_cfg, quiet_trainer, tmp_path
):
    """Scores and losses alike: with one image per batch and process, the batch means of the
    losses are per-image means in both runs, so their averages agree too."""
    overrides = [
        "trainer=ddp_cpu",
        "data.tasks=[semseg,depth,normals,sal]",
        "data.generate.n_val=7",  # 4 images on one process, 3 on the other
        f"data.root={tmp_path / 'synthetic_7_val'}",
    ]
    single = _validate(quiet_trainer, make_cfg(*overrides, "data.batch_size=1"), 1)
    double = _validate(quiet_trainer, make_cfg(*overrides, "data.batch_size=2"), 2)
    assert single.keys() == double.keys() and "val/semseg/mIoU" in single
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
