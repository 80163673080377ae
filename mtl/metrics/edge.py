"""Edge odsF / oisF / AP as a torchmetrics `Metric` whose matching runs in worker processes.

Each ``update`` crops the padding away, quantises the probabilities to uint8 (the exported PNG)
and hands the images to a process pool, so the CPU-heavy matching overlaps with the rest of the
evaluation loop; ``compute`` collects the per-image counts, sums them into the states (summed
across ranks under DDP) and derives the scores. The metric is only switched on for the epochs
``begin_epoch`` selects: every final evaluation (a test, the stand-alone validation that ends a
training run), and every N-th validation epoch of a fit when N is set.

Same as SEISM: binarisation ``png / 255 > t`` of the uint8 map, thinning, one-to-one matching
by the BSDS ``correspondPixels`` C++ code (also behind the MATLAB mex; its random outlier edges,
clock-seeded, make a perfect prediction lose about 0.5% of its matches and repeated runs differ
slightly), counts summed over images, odsF = plain max over thresholds (no interpolation), oisF
and AP with SEISM's rules for empty sums.

What still differs: the ground truth is the dataset's binary edge map as loaded (SEISM derives
boundaries with ``seg2bmap`` from its own label maps, e.g. PASCAL-Context's
``trainval/<id>.mat``); thinning is pyedgeeval's port of ``bwmorph(..., 'thin', Inf)``; AP takes
the first occurrence of repeated recall values (current MATLAB ``unique``); pixels marked 255 are
removed from both maps (SEISM has no ignore label); the optional NMS (pyedgeeval's port of
Dollár's edge NMS) is not part of SEISM.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from mtl.metrics.boundary import (
    MatchSettings,
    batch_counts,
    best_threshold_counts,
    boundary_scores,
    threshold_set,
    to_uint8,
)

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may use, shared among the training processes of the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


class EdgeBoundaryF(Metric):
    """odsF, oisF and AP of edge probabilities with the benchmark's one-to-one matching.

    Args:
        max_dist: matching tolerance, a fraction of the image diagonal (PASCAL 0.0075, NYUD 0.011).
        thresholds: a count (99 -> 0.01..0.99), "hed" (SEISM's HED set) or a list.
        thin: thin the binarised prediction before matching (the benchmark does).
        nms: apply pyedgeeval's edge NMS to the probabilities first.
        every_n_epochs: during a fit, evaluate every N-th validation epoch (0: never); a test
            and a stand-alone ``trainer.validate`` (the end of a training run) always evaluate.
        workers: matching processes (0: match in this process, synchronously; None: every
            available core, divided among the node's training processes).
        scored_ids: ids of the images to score (others are skipped; None: all), e.g. the
            dataset's edge evaluation list, set per evaluation by ``MetricsCallback``.
    """

    full_state_update = False
    uses_meta = True

    def __init__(
        self,
        max_dist: float = 0.0075,
        thresholds: int | str | Sequence[float] = 99,
        thin: bool = True,
        nms: bool = False,
        every_n_epochs: int = 0,
        workers: int | None = None,
        scored_ids: Collection[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = MatchSettings(
            max_dist=float(max_dist),
            thresholds=tuple(threshold_set(thresholds).tolist()),
            thin=bool(thin),
            nms=bool(nms),
        )
        self.every_n_epochs = int(every_n_epochs)
        self.workers = available_cores() if workers is None else int(workers)
        self.scored_ids = None if scored_ids is None else frozenset(scored_ids)
        self.active = True
        self._pool: Executor | None = None
        self._pending: list[Future | np.ndarray] = []
        k = len(self.settings.thresholds)
        self.add_state("counts", torch.zeros(k, 4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("best_counts", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def begin_epoch(self, stage: str, epoch: int, fitting: bool) -> None:
        """Switch matching on for a test epoch, a stand-alone validation (the final evaluation
        of a run, whatever the schedule) and a scheduled validation epoch of a fit; off
        otherwise (e.g. sanity checks)."""
        n = self.every_n_epochs
        if stage == "test" or (stage == "val" and not fitting):
            self.active = True
        else:
            self.active = stage == "val" and n > 0 and (epoch + 1) % n == 0
        if self.active:
            log.info(
                "edge odsF/oisF/AP: matching boundaries at %d thresholds in %s; this can take "
                "minutes (data.metric_options.edge.workers)",
                len(self.settings.thresholds),
                f"{self.workers} worker processes" if self.workers > 0 else "this process",
            )

    def update(self, preds: Tensor, target: Tensor, meta: Mapping[str, Any] | None = None) -> None:
        if not self.active:
            return
        # imported here: mtl.data imports the task registry, which imports this module
        from mtl.data.transforms import crop_to_original

        probs = torch.sigmoid(preds.detach().float())[:, 0]
        labels = target[:, 0] if target.dim() == 4 else target
        pad = (meta or {}).get("pad")
        if pad is not None:
            probs, labels = crop_to_original(probs, pad), crop_to_original(labels, pad)
        keep = range(len(probs))
        if self.scored_ids is not None:  # e.g. PASCAL-Context's edge evaluation list
            ids = [str(i) for i in (meta or {}).get("id", [])]
            if len(ids) != len(probs):
                raise ValueError("scoring the listed edge ids needs meta['id'] for every image")
            keep = [k for k, i in enumerate(ids) if i in self.scored_ids]
            if not keep:
                return
        edges = [to_uint8(probs[k].cpu().numpy()) for k in keep]
        truths = [labels[k].cpu().numpy().astype(np.uint8) for k in keep]
        if self.workers <= 0:
            self._pending.append(batch_counts(edges, truths, self.settings))
        else:
            job = self._executor().submit(batch_counts, edges, truths, self.settings)
            self._pending.append(job)

    def _executor(self) -> Executor:
        # fork where available: workers start at once and never re-import the main script; they
        # run only NumPy and pyedgeeval code, never torch (the same trade-off as DataLoader workers)
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self._pool

    def _collect(self) -> None:
        """Wait for the outstanding images and add their counts to the states."""
        pending, self._pending = self._pending, []
        for job in pending:
            counts = job.result() if isinstance(job, Future) else job  # [N, K, 4]
            self.counts += torch.from_numpy(counts.sum(0)).to(self.counts)
            best = np.stack([best_threshold_counts(c) for c in counts]).sum(0)
            self.best_counts += torch.from_numpy(best).to(self.best_counts)
            self.images += counts.shape[0]
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def sync(self, *args, **kwargs) -> None:  # collect local results before states are summed
        self._collect()
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        self._collect()
        scores = boundary_scores(self.counts.cpu().numpy(), self.best_counts.cpu().numpy())
        return {name: torch.tensor(value) for name, value in scores.items()}

    def reset(self) -> None:
        for job in self._pending:
            if isinstance(job, Future):
                job.cancel()
        self._pending = []
        super().reset()

    def __getstate__(self) -> dict[str, Any]:  # a pool and futures cannot be pickled or copied
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_pool": None, "_pending": []}
