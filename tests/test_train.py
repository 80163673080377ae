"""End-to-end: composing configs, training, the run files, resuming."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mtl.config import ConfigError
from mtl.train import build_datamodule, build_module, train

# Experiments on the built-in scenes; real-dataset experiments run in tests/test_datamodule.py
# on small folders written in their official formats.
# (ScaLearn's stage 2 needs a stage-1 checkpoint: tests/test_adapters_skills.py runs it.)
EXPERIMENTS = sorted(
    p.stem
    for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("synthetic_*.yaml")
    if "scalearn" not in p.stem
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_with_fast_dev_run(make_cfg, experiment):
    scores = train(make_cfg(f"experiment={experiment}", "debug=fdr"))
    assert "val/semseg/mIoU" in scores and "val/loss" in scores


def test_unknown_task_and_backbone_are_reported_together(make_cfg):
    cfg = make_cfg(
        "data.available_tasks=[semseg,depth]",
        "data.tasks=[semseg,normals,foo]",
        "model.backbone.name=resnet_18",
        "debug=fdr",
    )
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert "data.tasks: task 'normals' is not provided by dataset 'synthetic'" in message
    assert "data.tasks: unknown task 'foo'" in message
    assert (
        "model.backbone.name: 'resnet_18' is not a timm model; similar names: ['resnet18'"
        in message
    )


def _validation_losses(cfg) -> dict[str, float]:
    """Per-task validation losses of the freshly initialised model of `cfg`."""
    import lightning as L

    L.seed_everything(cfg.seed)
    datamodule, module = build_datamodule(cfg.data), build_module(cfg)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


def test_training_lowers_every_validation_loss_and_writes_run_files(make_cfg, tmp_path):
    overrides = ("trainer.max_epochs=10", "optim.scheduler.warmup_steps=5", "data.batch_size=4")
    before = _validation_losses(make_cfg(*overrides))
    scores = train(make_cfg(*overrides))
    for task in ("semseg", "depth", "normals", "edge", "sal"):
        key = f"val/{task}/loss"
        assert scores[key] < 0.8 * before[key], f"{key}: {before[key]:.4f} -> {scores[key]:.4f}"

    run = tmp_path / "run"
    assert (run / "config.yaml").read_text().count("${") == 0  # resolved
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/semseg/mIoU", "val/depth/rmse", "val/normals/mean_angle", "val/loss"):
        assert isinstance(metrics[key], float)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert "train/loss" in rows[0] and "val/semseg/mIoU" in rows[0]
    step_rows = [row for row in rows if row["train/loss"]]
    assert step_rows  # every row a logger wrote for a step holds every task's loss and weight
    for row in step_rows:
        for task in ("semseg", "depth", "normals", "edge", "sal"):
            assert row[f"train/{task}/loss"] and row[f"balancer/{task}/weight"], row["step"]


def test_resume_from_last_checkpoint_continues_from_its_step(make_cfg, tmp_path):
    first = make_cfg("trainer.max_epochs=1", output_dir=tmp_path / "first")
    train(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert steps_per_epoch == 16 // 4

    resumed = make_cfg("trainer.max_epochs=2", f"ckpt_path={last}", output_dir=tmp_path / "second")
    train(resumed)
    state = torch.load(
        tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert state["global_step"] == 2 * steps_per_epoch
    assert state["epoch"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["balancer=uncertainty", "balancer.mode=rep"], "'rep' is for gradient methods"),
        (["balancer=pcgrad", "balancer.mode=rep", "flat=sam"], "cannot be combined with flat"),
        (["balancer=pcgrad", "+trainer.strategy=fsdp"], "trainer.strategy: 'fsdp' shards"),
        (["balancer=equal", "flat=asam", "+trainer.strategy=deepspeed"], "with flat regions"),
        (["balancer=mgda", "balancer.mode=fast"], "balancer.mode: 'fast'"),
        (["balancer=cagrad", "trainer.precision=16-mixed"], "use bf16-mixed or 32-true"),
        (["balancer=equal", "trainer.precision=16"], "'16' scales the loss for float16"),
    ],
)
def test_invalid_balancer_combinations_fail_before_building(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*overrides, "debug=fdr"))


def test_global_batch_not_divisible_by_processes_fails_before_building(make_cfg):
    with pytest.raises(ConfigError, match=r"data.batch_size: 5 .* trainer.devices x"):
        train(make_cfg("data.batch_size=5", "trainer=ddp_cpu"))
