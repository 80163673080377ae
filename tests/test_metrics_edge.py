"""Edge odsF/oisF/AP with the benchmark's matching (needs the optional pyedgeeval package)."""

import math
import re

import numpy as np
import pytest
import torch

from mtl.metrics.boundary import (
    HED_THRESHOLDS,
    average_precision,
    precision_recall,
    pyedgeeval_available,
    threshold_set,
)

pytestmark = pytest.mark.skipif(
    not pyedgeeval_available(), reason="pyedgeeval not installed (pip install -e '.[edge]')"
)

H, W = 40, 60  # diagonal 72.1 px: max_dist 0.02 -> 1.44 px tolerance

# The matching is solved to its optimum, so a correct prediction scores exactly 1 (the
# benchmark's C++ solver, with its random outlier edges, loses about 0.5% of those matches).


def _edge_map(rows=(), cols=()) -> np.ndarray:
    gt = np.zeros((H, W), dtype=np.float32)
    for r in rows:
        gt[r, 5:55] = 1
    for c in cols:
        gt[5:35, c] = 1
    return gt


def _as_batch(*maps: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(maps)[:, None])


def _logits(*maps: np.ndarray) -> torch.Tensor:
    """Confident logits of binary maps (probability 1 on the map, 0 elsewhere)."""
    return (_as_batch(*maps) * 2 - 1) * 30


def _metric(preds: torch.Tensor, target: torch.Tensor, meta=None, **options):
    from mtl.metrics.edge import EdgeBoundaryF

    metric = EdgeBoundaryF(**{"max_dist": 0.02, "thresholds": 9, "workers": 0, **options})
    metric.update(preds, target, meta=meta)
    return metric


def _scores(preds: torch.Tensor, target: torch.Tensor, **options) -> dict[str, float]:
    return {k: v.item() for k, v in _metric(preds, target, **options).compute().items()}


def _assert_same_counts(a, b) -> None:
    a.compute(), b.compute()
    assert torch.equal(a.counts, b.counts) and torch.equal(a.best_counts, b.best_counts)


def test_perfect_prediction_scores_one():
    gt = _edge_map(rows=[10], cols=[40])
    scores = _scores(_logits(gt), _as_batch(gt))
    assert scores["odsF"] == 1.0 and scores["oisF"] == 1.0


def test_one_pixel_shift_inside_tolerance_is_free_beyond_it_costs():
    gt = _edge_map(rows=[10, 30])
    assert _scores(_logits(np.roll(gt, 1, axis=0)), _as_batch(gt))["odsF"] == 1.0
    assert _scores(_logits(np.roll(gt, 3, axis=0)), _as_batch(gt))["odsF"] == 0.0


def test_counts_are_summed_over_images_not_averaged():
    small, large = _edge_map(rows=[10]), _edge_map(rows=[10, 20, 30])  # 50 and 150 pixels
    preds = _logits(small, np.roll(large, 5, axis=0))  # image 1 perfect, image 2 all wrong
    scores = _scores(preds, _as_batch(small, large))
    # summed: P = 50/200, R = 50/200 -> F = 0.25 (a mean of per-image F would be 0.5)
    assert scores["odsF"] == 0.25 and scores["oisF"] == 0.25


def test_best_single_threshold_over_the_dataset():
    gt = _edge_map(rows=[10])
    wrong = _edge_map(rows=[30])
    probs = gt * 0.8 + wrong * 0.3  # the true line is stronger than the false one
    logits = torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6))[None, None]
    scores = _scores(logits, _as_batch(gt))
    assert scores["odsF"] == 1.0  # a threshold in (0.3, 0.8) keeps only the true line
    assert 0 < scores["ap"] <= 1


def test_padding_and_ignore_pixels_are_removed():
    gt = _edge_map(rows=[10], cols=[40])
    plain = _metric(_logits(gt), _as_batch(gt))
    padded_gt = np.pad(gt, ((0, 8), (0, 12)), constant_values=255)
    junk = np.pad(gt, ((0, 8), (0, 12)), constant_values=1)  # edges predicted in the padding
    meta = {"pad": [torch.tensor([0]), torch.tensor([8]), torch.tensor([0]), torch.tensor([12])]}
    _assert_same_counts(_metric(_logits(junk), _as_batch(padded_gt), meta=meta), plain)
    ignored_gt = gt.copy()
    ignored_gt[:, 50:] = 255  # ignored pixels: neither ground truth nor prediction
    cut = gt.copy()
    cut[:, 50:] = 0
    _assert_same_counts(
        _metric(_logits(gt), _as_batch(ignored_gt)), _metric(_logits(cut), _as_batch(cut))
    )


def test_worker_processes_give_exactly_the_counts_of_one_process(monkeypatch, caplog):
    """Four batches matched by two worker processes at once: the same counts, to the pixel, as
    matching them one after the other in this process; while waiting for the workers, lines
    with the progress and the time left."""
    from mtl.metrics import edge
    from mtl.metrics.edge import EdgeBoundaryF

    monkeypatch.setattr(edge, "PROGRESS_EVERY_S", 0.001)
    caplog.set_level("INFO", logger=edge.__name__)

    rng = np.random.default_rng(0)
    gt = _edge_map(rows=[10, 25], cols=[20, 45])
    batches = []
    for _ in range(4):
        probs = np.clip(gt * 0.7 + rng.random(gt.shape) * 0.4, 0, 1)
        logits = torch.logit(torch.from_numpy(probs).float().clamp(1e-4, 1 - 1e-4))[None, None]
        batches.append((logits, _as_batch(gt)))
    parallel, serial = (EdgeBoundaryF(max_dist=0.02, thresholds=19, workers=n) for n in (2, 0))
    for metric in (parallel, serial):  # the workers' jobs are pending until compute()
        for logits, target in batches:
            metric.update(logits, target)
        metric.compute()
    _assert_same_counts(parallel, serial)
    assert parallel.compute() == serial.compute()
    assert int(parallel.images) == 4 and int(parallel.counts[:, 3].sum()) > 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        re.fullmatch(r"edge .*: [0-3] of 4 images matched \(.*/s\), about .* left", x)
        for x in lines
    )
    assert any(
        x.startswith("edge odsF/oisF/AP: 4 images matched at 19 thresholds in") for x in lines
    )


def test_online_checks_use_fewer_thresholds_final_evaluations_all(caplog):
    """online_thresholds=2 of 9: a scheduled validation of the fit scores at 0.1 and 0.9 only,
    exactly as a metric with only those thresholds (odsF 2/3: both lines kept at 0.1), and says
    so; the final one at all 9 (odsF 1: 0.5 keeps only the true line)."""
    from mtl.metrics.edge import EdgeBoundaryF

    caplog.set_level("INFO", logger="mtl.metrics.edge")
    gt, wrong = _edge_map(rows=[10]), _edge_map(rows=[30])
    probs = torch.from_numpy(gt * 0.8 + wrong * 0.3).clamp(1e-6, 1 - 1e-6)
    logits, target = torch.logit(probs)[None, None], _as_batch(gt)
    options = {"max_dist": 0.02, "workers": 0}
    metric = EdgeBoundaryF(thresholds=9, every_n_epochs=1, online_thresholds=2, **options)
    metric.begin_epoch("val", epoch=0, fitting=True)
    metric.update(logits, target)
    online = metric.compute()
    assert online == _metric(logits, target, thresholds=[0.1, 0.9]).compute()
    assert "2 of the 9 thresholds (online_thresholds; final evaluations use all 9)" in caplog.text
    metric.reset()
    metric.begin_epoch("val", epoch=0, fitting=False)
    metric.update(logits, target)
    assert math.isclose(online["odsF"].item(), 2 / 3, rel_tol=1e-6)
    assert metric.compute() == _metric(logits, target, thresholds=9).compute()
    assert metric.compute()["odsF"] == 1.0


def test_schedule_switches_matching_on_and_off():
    from mtl.metrics.edge import EdgeBoundaryF

    metric = EdgeBoundaryF(every_n_epochs=2, workers=0)
    metric.begin_epoch("val", epoch=0, fitting=True)
    assert not metric.active
    metric.begin_epoch("val", epoch=1, fitting=True)
    assert metric.active
    metric.begin_epoch("sanity", epoch=1, fitting=True)
    assert not metric.active
    metric.begin_epoch("val", epoch=0, fitting=False)  # validation after the fit: always
    assert metric.active
    metric.begin_epoch("test", epoch=0, fitting=False)
    assert metric.active
    unscheduled = EdgeBoundaryF(every_n_epochs=0, workers=0)
    unscheduled.begin_epoch("val", epoch=1, fitting=True)
    assert not unscheduled.active
    unscheduled.begin_epoch("val", epoch=0, fitting=False)  # the final evaluation of a run
    assert unscheduled.active
    unscheduled.begin_epoch("test", epoch=0, fitting=False)
    assert unscheduled.active


def test_threshold_sets_and_seism_rules():
    assert np.allclose(threshold_set(99), np.arange(1, 100) / 100)
    assert len(threshold_set("hed")) == 101 and threshold_set("hed")[0] == HED_THRESHOLDS[0]
    # no ground truth: recall 1, precision 0; no prediction: recall 0, precision 1
    precision, recall = precision_recall(np.array([[0, 0, 0, 5], [0, 5, 0, 0]]))
    assert precision.tolist() == [0.0, 1.0] and recall.tolist() == [1.0, 0.0]
    # AP: precision interpolated at recall 0, 0.01, ..., 1 inside the curve, / 100
    ap = average_precision(np.array([1.0, 0.5]), np.array([0.5, 1.0]))
    assert math.isclose(ap, sum(1.0 - (r - 0.5) for r in np.linspace(0.5, 1, 51)) / 100)


def test_only_the_listed_images_are_scored(tmp_path):
    """One image predicted exactly, one with no edge at all: scored on the list of the exact one
    (PASCAL-Context's data.edge_eval_list), odsF is ~1; on both it is far lower. The export's
    ids.txt (SEISM's id list) holds only the listed id."""
    from functools import partial

    from mtl.data.formats import write_pascal
    from mtl.data.pascal_context import PASCALContextDataset
    from mtl.metrics.subsets import scored_ids

    root = tmp_path / "PASCAL_MT"
    write_pascal(root, {"train": ["p0"], "val": ["p3", "p4"]}, (30, 40))
    listing = tmp_path / "test_new.txt"
    listing.write_text("p4\n")
    full = _listed_validation(tmp_path / "all", partial(PASCALContextDataset, root=root))
    listed = _listed_validation(
        tmp_path / "list", partial(PASCALContextDataset, root=root, edge_eval_list=listing)
    )
    assert listed["val/edge/odsF"] == 1.0
    assert full["val/edge/odsF"] < 0.9
    assert (tmp_path / "list" / "ids.txt").read_text() == "p4\n"
    assert (tmp_path / "all" / "ids.txt").read_text() == "p3\np4\n"
    every = PASCALContextDataset(root, "val", ["edge"])
    assert scored_ids(every, "edge") is None and scored_ids(every, "semseg") is None


def _listed_validation(out, dataset) -> dict[str, float]:
    """``trainer.validate`` of a model that predicts image p4's edges exactly and none on p3."""
    import lightning as L

    from mtl.data.datamodule import MultiTaskDataModule
    from mtl.export import PredictionWriter
    from mtl.metrics.callback import MetricsCallback
    from mtl.metrics.collection import TaskMetrics

    class Oracle(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            options = {"edge": {"max_dist": 0.02, "thresholds": 9, "workers": 0}}
            self.metrics = TaskMetrics(["edge"], {}, options=options)

        def validation_step(self, batch, batch_idx):
            exact = torch.tensor([i == "p4" for i in batch["meta"]["id"]]).view(-1, 1, 1, 1)
            logits = torch.where(exact & (batch["edge"] == 1), 30.0, -30.0)
            self.metrics.update({"edge": logits}, batch)
            return {"edge": logits}

        def on_validation_epoch_end(self) -> None:
            for key, value in self.metrics.compute().items():
                self.log(f"val/{key}", value)
            self.metrics.reset()

    datamodule = MultiTaskDataModule(dataset, ["edge"], batch_size=2, check_files=0)
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[MetricsCallback(), PredictionWriter(out, max_visuals=0)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return {k: float(v) for k, v in trainer.validate(Oracle(), datamodule=datamodule)[0].items()}


def test_the_matching_pool_outlives_a_stop_signal_to_the_whole_job():
    """SLURM's SIGTERM and Ctrl+C reach the pool's workers too: they leave the signal to the
    training process, so the pool keeps matching (a killed worker would break it)."""
    import os
    import signal

    from mtl.metrics.edge import EdgeBoundaryF

    metric = EdgeBoundaryF(workers=2)
    pool = metric._executor()
    pids = {pool.submit(os.getpid).result() for _ in range(8)}
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    assert pool.submit(os.getpid).result(timeout=30)  # not broken
    for pid in pids:
        os.kill(pid, 0)  # still running: raises ProcessLookupError otherwise
    pool.shutdown()


def test_the_matching_pool_ends_with_the_process_that_started_it():
    """A training process killed outright leaves no matching worker behind, although the
    workers ignore the job's signals."""
    import subprocess
    import sys
    import time

    program = (
        "import os\n"
        "from mtl.metrics.edge import EdgeBoundaryF\n"
        "pool = EdgeBoundaryF(workers=2)._executor()\n"
        "print(' '.join(map(str, {pool.submit(os.getpid).result() for _ in range(8)})))\n"
        "os._exit(0)\n"  # gone without shutting the pool down
    )
    # the workers hold the output pipes: the run returns once they are gone (never, if they
    # outlive their parent)
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    pids = [int(p) for p in done.stdout.split()]
    assert done.returncode == 0 and pids, done.stderr[-2000:]

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, pids))
