"""Metric states summed over 2 CPU processes (gloo) equal 1 process on the union of the data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtl.metrics.boundary import pyedgeeval_available
from mtl.metrics.collection import TaskMetrics

TASKS = ["semseg", "depth", "normals", "sal", "edge"]
OPTIONS = {"edge": {"max_dist": 0.03, "thresholds": 5, "workers": 0}}
IMAGES, H, W = 6, 12, 16


def _data(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Predictions and targets of every task for IMAGES images (invalid pixels included)."""
    g = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, 4, (IMAGES, H, W), generator=g)
    semseg[:, :2] = 255
    depth = torch.rand(IMAGES, 1, H, W, generator=g) * 5
    depth[:, :, :, :3] = 0
    normals = torch.nn.functional.normalize(torch.randn(IMAGES, 3, H, W, generator=g), dim=1)
    normals[:, :, -2:] = 0
    sal = (torch.rand(IMAGES, 1, H, W, generator=g) < 0.3).float()
    sal[:, :, 0] = 255
    edge = torch.zeros(IMAGES, 1, H, W)
    edge[:, :, 4, 2:14] = 1
    edge[:, :, 2:10, 9] = 1
    targets = {"semseg": semseg, "depth": depth, "normals": normals, "sal": sal, "edge": edge}
    preds = {
        "semseg": torch.randn(IMAGES, 4, H, W, generator=g),
        "depth": depth + torch.randn(IMAGES, 1, H, W, generator=g),
        "normals": normals + 0.5 * torch.randn(IMAGES, 3, H, W, generator=g),
        "sal": torch.randn(IMAGES, 1, H, W, generator=g),
        "edge": (edge * 2 - 1) * 3 + torch.randn(IMAGES, 1, H, W, generator=g),
    }
    return preds, targets


def _tasks() -> list[str]:
    return TASKS if pyedgeeval_available() else TASKS[:-1]


def _scores(indices: slice) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    metrics = TaskMetrics(_tasks(), {"semseg": 4}, options=OPTIONS)
    preds, targets = _data()
    for start in range(indices.start, indices.stop, indices.step * 2):  # batches of 2 images
        batch = slice(start, start + indices.step * 2, indices.step)
        metrics.update(
            {t: p[batch] for t, p in preds.items()}, {t: v[batch] for t, v in targets.items()}
        )
    scores = {k: v.item() for k, v in metrics.compute().items()}
    states = {}
    if "edge" in metrics.metrics:  # pixel sums per threshold, summed over the processes
        edge = metrics.metrics["edge"]["boundary"]
        synced = dist.is_available() and dist.is_initialized()
        if synced:
            edge.sync()
        states["edge_sums"] = edge.counts[:, [1, 3]].clone()
        if synced:
            edge.unsync()
    return scores, {**metrics.tables, **states}


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        scores, tables = _scores(slice(rank, IMAGES, world_size))  # rank r: images r, r+2, ...
        if rank == 0:
            Path(out).write_bytes(pickle.dumps((scores, tables)))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    out = tmp_path / "scores.pkl"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    synced, synced_tables = pickle.loads(out.read_bytes())
    single, single_tables = _scores(slice(0, IMAGES, 1))
    assert synced.keys() == single.keys()
    for key, value in single.items():
        if key.startswith("edge/"):  # the matching itself is randomised (see test_metrics_edge)
            assert synced[key] == pytest.approx(value, abs=0.03), key
        else:
            assert synced[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    np.testing.assert_allclose(
        synced_tables["semseg/per_class_iou"], single_tables["semseg/per_class_iou"], rtol=1e-6
    )
    if "edge_sums" in single_tables:
        assert torch.equal(synced_tables["edge_sums"], single_tables["edge_sums"])
