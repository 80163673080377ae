"""Experiment tracking and scale: W&B offline runs, multirun jobs, DDP on CPU processes, loggers.

The subprocess tests run `train.py` the way users do; they are the slow part of this file."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from mtl import wandb_run
from mtl.loggers import build_loggers, finish_loggers
from mtl.render import COLOUR_BAR_WIDTH
from mtl.wandb_media import (
    PredictionImages,
    class_labels,
    colourise,
    segmentation_masks,
)

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, data_root: Path, timeout: int = 300) -> None:
    """``python train.py [flags] <tiny overrides> <args>`` in `tmp_path`, W&B offline."""
    flags = [a for a in args if a.startswith("-")]
    args = [a for a in args if not a.startswith("-")]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    env.update(
        {
            k: str(tmp_path / "wandb_home")
            for k in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
        }
    )
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *flags,
        *TINY_RUN,
        f"data.root={data_root}",
        *args,
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _sane_metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0 <= metrics["val/semseg/mIoU"] <= 1 and metrics["val/depth/rmse"] > 0
    return metrics


def wandb_records(run_folder: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file (a LevelDB-style log of
    protobuf records: 7-byte header, 32 KiB blocks, chunks with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pos, block, buffer = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buffer = chunk if kind in (1, 2) else buffer + chunk  # full/first, middle/last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buffer)
            records.append(record)
    return records


def _offline_run(run_dir: Path) -> Path:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_multirun_jobs_get_own_folders_and_own_wandb_runs(tmp_path, tiny_data_root):
    sweep = tmp_path / "sweep"
    _run(
        [
            "-m",
            "seed=1,2",
            "logger=[csv,wandb]",
            "+trainer.limit_train_batches=2",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        tiny_data_root,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    ids = []
    for job in jobs:
        _sane_metrics(job)
        ids.append(wandb_run.read_run_id(job))
        assert _offline_run(job).name.endswith(ids[-1])  # the stored id is the run's id
    assert len(set(ids)) == 2  # wandb.finish between jobs: no shared run

    folder = _offline_run(jobs[1])
    records = wandb_records(folder)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == ids[1] and list(run.tags) == ["dev"]
    assert "seed=2" in run.display_name.split(",")  # named by the job's overrides
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["seed"] == 2 and config["data"]["tasks"] == ["semseg", "depth"]
    history = [
        {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    scores = [h for h in history if "val/semseg/mIoU" in h]
    assert scores and 0 <= float(scores[-1]["val/semseg/mIoU"]) <= 1
    assert any("val/images/semseg/all_masks" in h for h in history)
    summary = {}  # the run summary: the last update of each key
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(
                {i.key or "/".join(i.nested_key): i.value_json for i in r.summary.update}
            )
    metrics = json.loads((jobs[1] / "metrics.json").read_text())
    assert float(summary["val/semseg/mIoU"]) == pytest.approx(metrics["val/semseg/mIoU"])
    media = folder / "files" / "media"
    for task in ("input", "semseg", "depth"):
        assert list(media.glob(f"images/val/images/{task}_*.png")), task
    assert list(media.glob("images/mask/val/images/semseg_*.mask.png"))
    table = json.loads(next(media.glob("table/val/semseg/per_class_iou_*.table.json")).read_text())
    assert [row[1] for row in table["data"]] == ["floor", "wall", "sphere", "box", "cylinder"]
    assert "exit" in kinds  # finished


def test_ddp_on_two_cpu_processes_splits_the_global_batch(tmp_path, tiny_data_root):
    run = tmp_path / "run"
    _run(
        ["trainer=ddp_cpu", f"paths.output_dir={run}"],
        tmp_path,
        tiny_data_root,
    )
    _sane_metrics(run)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # data.batch_size=4 is global: 2 per process, 16 images -> 4 steps (2 if it were per process)
    assert state["global_step"] == 16 // 4


def test_wandb_run_id_is_stored_and_found_from_a_checkpoint(tmp_path):
    first = tmp_path / "first"
    run_id = wandb_run.run_id(first)
    assert wandb_run.run_id(first) == run_id  # restarted job, same directory
    (first / "checkpoints").mkdir()
    ckpt = first / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")
    assert wandb_run.run_id(tmp_path / "second", ckpt) == run_id  # resumed in a new directory
    assert wandb_run.read_run_id(tmp_path / "second") == run_id
    assert wandb_run.run_id(tmp_path / "third") != run_id


def test_prediction_images_name_classes_and_ignore():
    callback = PredictionImages(class_names={"semseg": ["floor", "wall", "box"]})
    semseg_target = torch.zeros(2, 8, 8, dtype=torch.long)
    semseg_target[:, 0] = 255
    batch = {
        "image": torch.randn(2, 3, 8, 8),
        "semseg": semseg_target,
        "depth": torch.rand(2, 1, 8, 8) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 8, 8), dim=1),
    }
    preds = {
        "semseg": torch.randn(2, 3, 8, 8),
        "depth": torch.rand(2, 1, 8, 8),
        "normals": torch.randn(2, 3, 8, 8),
    }
    media = callback.images(preds, batch)
    assert sorted(media) == [f"val/images/{t}" for t in ("depth", "input", "normals", "semseg")]
    assert all(len(images) == 2 for images in media.values())
    depth = np.asarray(media["val/images/depth"][1].image)
    assert depth.shape == (8, 16 + COLOUR_BAR_WIDTH, 3)  # pred | target | colour bar
    top = float(batch["depth"][1].max())  # the colour scale: 0 to the largest target depth
    assert media["val/images/depth"][1]._caption.endswith(f"0 (dark) to {top:.3g} (yellow)")
    assert depth[0, 16].tolist() == [253, 231, 37] and depth[-1, 16].tolist() == [68, 1, 84]

    labels = class_labels("semseg", 3, callback.class_names["semseg"])
    assert labels == {0: "floor", 1: "wall", 2: "box", 255: "ignore"}
    masks = segmentation_masks(preds["semseg"][0].argmax(0), semseg_target[0], labels)
    truth = masks["ground_truth"]["mask_data"]
    assert truth.dtype == np.uint8 and truth[0].tolist() == [255] * 8
    assert masks["prediction"]["class_labels"][255] == "ignore"
    with pytest.raises(ValueError, match="every_n_val_epochs"):
        PredictionImages(every_n_val_epochs=0)


def test_colourise_orders_values_and_blacks_out_invalid():
    values = np.array([[0.0, 0.5, 1.0, 0.7]])
    rgb = colourise(values, 0, 1, valid=np.array([[True, True, True, False]]))
    assert rgb[0, 0].tolist() == [68, 1, 84] and rgb[0, 2].tolist() == [253, 231, 37]
    assert rgb[0, 3].tolist() == [0, 0, 0]


def test_tensorboard_and_csv_loggers_compose_and_write(make_cfg, tmp_path):
    cfg = make_cfg("logger=[csv,tensorboard]")
    loggers = build_loggers(cfg)
    names = sorted(type(lg).__name__ for lg in loggers)
    assert names == ["ResumableCSVLogger", "TensorBoardLogger"]
    from omegaconf import OmegaConf

    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics({"val/loss": 1.0}, step=0)
        logger.finalize("success")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    finish_loggers()  # no W&B run: a no-op


def test_wandb_logger_is_configured_from_config(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = make_cfg("logger=wandb", "logger.wandb.project=proj", "tags=[a,b]")
    (logger,) = build_loggers(cfg)
    try:
        init = logger._wandb_init
        assert init["project"] == "proj" and init["tags"] == ["a", "b"]
        assert "anonymous" not in init  # W&B warns about the setting whenever it is passed
        assert init["mode"] == "disabled" and init["id"] == wandb_run.read_run_id(
            cfg.paths.output_dir
        )
    finally:
        finish_loggers()
    monkeypatch.delenv("WANDB_MODE")
    assert make_cfg("logger=wandb").logger.wandb.mode == "offline"


def test_wandb_run_is_finished_when_the_job_fails(make_cfg, monkeypatch):
    import lightning as L
    import wandb

    from mtl.train import train

    def fail(*args, **kwargs):
        assert wandb.run is not None  # the job's W&B run has started
        raise RuntimeError("failed during fit")

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(L.Trainer, "fit", fail)
    finish, seen = wandb.finish, []
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None: seen.append(exit_code) or finish())
    with pytest.raises(RuntimeError, match="failed during fit"):
        train(make_cfg("logger=wandb", "data.tasks=[semseg]"))
    assert seen == [1] and wandb.run is None  # finished, marked failed


def test_wandb_and_tensorboard_file_values_by_step_and_summary_is_the_evaluated_epoch(
    make_cfg, monkeypatch, tmp_path
):
    """What reaches W&B (every ``Run.log`` call and the run summary at the end) and TensorBoard
    in a two-epoch fit of three batches per epoch, gradient statistics every second step."""
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from wandb.sdk.wandb_run import Run

    from mtl.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    logged, summary = [], {}
    log = Run.log
    monkeypatch.setattr(
        Run, "log", lambda run, data, *a, **k: logged.append(data) or log(run, data, *a, **k)
    )
    finish = wandb.finish

    def keep_summary(*args, **kwargs):
        summary.update(wandb.run.summary._as_dict())
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", keep_summary)
    cfg = make_cfg(
        "logger=[wandb,tensorboard]",
        "data.tasks=[semseg,depth,normals]",
        "model/decoder=conv",
        "model.backbone.out_indices=[1,2]",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "diagnostics_every_n_steps=2",
    )
    scores = train(cfg)

    def steps(key: str) -> list[int]:
        return [d["trainer/global_step"] for d in logged if key in d]

    # two validation epochs after batches 0-2 and 3-5, filed under the step of their last batch
    # (Lightning's convention); the final re-validation adds no third point
    assert steps("val/semseg/mIoU") == [2, 5] and steps("val/normals/within_11.25") == [2, 5]
    for media in ("val/images/depth", "val/images/semseg", "val/semseg/per_class_iou"):
        assert steps(media) == [2, 5], media
    assert sorted({d["epoch"] for d in logged if "epoch" in d}) == [0, 1]
    caption = next(d for d in logged if "val/images/depth" in d)["val/images/depth"][0]._caption
    assert "colour scale 0 (dark) to" in caption
    # gradient statistics on the steps they are computed on, and only there
    assert steps("grad/conflict_share") == [0, 2, 4]
    assert steps("grad/semseg/norm") == [0, 2, 4]

    # the run summary holds the evaluated checkpoint's scores, dotted names included
    evaluated = {k: v for k, v in scores.items() if k.startswith("val/")}
    assert {"val/normals/within_11.25", "val/semseg/mIoU", "val/loss"} <= set(evaluated)
    for key, value in evaluated.items():
        assert summary[key] == pytest.approx(value), key
    assert summary["evaluated_checkpoint"].endswith(".ckpt")

    # TensorBoard: the same pictures, on the step of the validation scores
    events = Path(cfg.paths.output_dir) / "tensorboard"  # one file per fit / validate
    board = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    images = board.Tags()["images"]
    assert {"val/images/input", "val/images/semseg", "val/images/depth"} <= set(images)
    assert [e.step for e in board.Images("val/images/depth")] == [2, 5]
    assert [e.step for e in board.Scalars("val/semseg/mIoU")][:2] == [2, 5]
    assert [e.step for e in board.Scalars("grad/conflict_share")] == [0, 2, 4]


def test_a_newly_registered_task_is_drawn_and_exported_from_its_registry_kind(
    monkeypatch, tmp_path
):
    """A task added to the registry (a copy of depth under another name) needs no code in the
    W&B/TensorBoard pictures or the prediction export."""
    import dataclasses

    from PIL import Image

    from mtl.export import PredictionWriter
    from mtl.tasks import TASKS, register

    monkeypatch.setitem(TASKS, "height", dataclasses.replace(TASKS["depth"], name="height"))
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 1, 8, 8, generator=g) * 3
    target = torch.rand(2, 1, 8, 8, generator=g) * 2 + 0.5
    target[:, :, 0] = 0  # invalid row
    batch = {
        "image": torch.randn(2, 3, 8, 8, generator=g),
        "height": target,
        "meta": {"id": ["a", "b"]},
    }
    images = PredictionImages().images({"height": pred}, batch)["val/images/height"]
    top = float(target[1].max())
    assert images[1]._caption.endswith(f"0 (dark) to {top:.3g} (yellow)")
    picture = np.asarray(images[1].image)
    assert picture.shape == (8, 16 + COLOUR_BAR_WIDTH, 3)
    assert picture[0, 8:16].tolist() == [[0, 0, 0]] * 8  # invalid target pixels black
    board = PredictionImages(max_images=2).pictures({"height": pred}, batch)
    assert board["val/images/height"].shape == (16, 16 + COLOUR_BAR_WIDTH, 3)

    writer = PredictionWriter(tmp_path, max_visuals=1)
    writer.write_batch({"height": pred}, batch)
    stored = np.asarray(Image.open(tmp_path / "height" / "b.png"))  # uint16 millimetres
    assert stored.dtype == np.uint16
    assert np.allclose(stored / 1000, pred[1, 0].numpy(), atol=5e-4)
    assert (tmp_path / "visual" / "a.png").is_file()

    with pytest.raises(ValueError, match="kind 'picture'"):
        register(dataclasses.replace(TASKS["depth"], name="other", kind="picture"))
