"""Edge odsF / oisF / AP as a torchmetrics `Metric` whose matching runs in worker processes.

Each ``update`` crops the padding away, quantises the probabilities to uint8 (the exported PNG)
and hands the images to a process pool, so the CPU-heavy matching overlaps with the rest of the
evaluation loop; ``compute`` collects the per-image counts, sums them into the states (summed
across ranks under DDP) and derives the scores. The metric is only switched on for the epochs
``begin_epoch`` selects: every final evaluation (a test, the stand-alone validation that ends a
training run), and every N-th validation epoch of a fit when N is set; those online checks may
use fewer thresholds (``online_thresholds``), final evaluations always use the full set. While
``compute`` waits for the workers it logs the progress and the expected end every
``PROGRESS_EVERY_S`` seconds.

Same as SEISM: binarisation ``png / 255 > t`` of the uint8 map, thinning, the one-to-one
matching of the BSDS ``correspondPixels`` code (same costs, same outlier cost), counts summed
over images, odsF = plain max over thresholds (no interpolation), oisF and AP with SEISM's rules
for empty sums. The matching problem is solved to its optimum (`mtl.metrics.matching`); the C++
solver reaches the same optimum except for the random outlier edges of its graph, clock-seeded,
which make a perfect prediction lose about 0.5% of its matches and repeated SEISM runs differ
slightly. Counts therefore equal the benchmark code's up to those losses, and are the same
whatever the number of workers.

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
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from mtl.job_signals import pool_worker_init
from mtl.metrics.boundary import (
    MatchSettings,
    batch_counts,
    best_threshold_counts,
    boundary_scores,
    threshold_set,
    to_uint8,
)

log = logging.getLogger(__name__)

#: Seconds between two progress lines while ``compute`` waits for the matching workers.
PROGRESS_EVERY_S = 30.0


def available_cores() -> int:
    """CPU cores this process may use, shared among the training processes of the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def edge_option_problems(options: Mapping[str, Any]) -> list[str]:
    """Bad values among the edge metric's options (``data.metric_options.edge``), one line each."""
    problems = []
    workers = options.get("workers")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 0
    ):
        problems.append(
            f"data.metric_options.edge.workers: {workers!r}; expected a count of processes >= 0 "
            "(0: match in the evaluating process) or null (every available core)"
        )
    online = options.get("online_thresholds", 0)
    if isinstance(online, bool) or not isinstance(online, int) or online < 0:
        problems.append(
            f"data.metric_options.edge.online_thresholds: {online!r}; expected a count >= 0 "
            "(0: every threshold)"
        )
    try:
        valid = len(threshold_set(options.get("thresholds", 99))) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        problems.append(
            f"data.metric_options.edge.thresholds: {options.get('thresholds')!r}; expected a "
            "count (99), 'hed' or a list of thresholds"
        )
    return problems


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
        online_thresholds: during a fit's scheduled validation epochs, use only this many of
            the thresholds, evenly spread (0: all); final evaluations always use all.
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
        online_thresholds: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        options = {"workers": workers, "online_thresholds": online_thresholds}
        problems = edge_option_problems({**options, "thresholds": thresholds})
        if problems:
            raise ValueError("; ".join(problems))
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
        k = len(self.settings.thresholds)
        self.online_thresholds = int(online_thresholds)
        self.in_use = np.arange(k)  # indices of the thresholds this epoch uses
        self._pool: Executor | None = None
        self._pending: list[tuple[int, Future | np.ndarray]] = []  # (images, their counts)
        self._started: float | None = None
        self.add_state("counts", torch.zeros(k, 4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("best_counts", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def begin_epoch(self, stage: str, epoch: int, fitting: bool) -> None:
        """Switch matching on for a test epoch, a stand-alone validation (the final evaluation
        of a run, whatever the schedule) and a scheduled validation epoch of a fit; off
        otherwise (e.g. sanity checks)."""
        n = self.every_n_epochs
        k = len(self.settings.thresholds)
        final = stage == "test" or (stage == "val" and not fitting)
        if final:
            self.active = True
        else:
            self.active = stage == "val" and n > 0 and (epoch + 1) % n == 0
        online = self.online_thresholds
        self.in_use = (
            np.unique(np.round(np.linspace(0, k - 1, online)).astype(int))
            if not final and 0 < online < k
            else np.arange(k)
        )
        if self.active:
            log.info(
                "edge odsF/oisF/AP: matching boundaries at %s in %s "
                "(data.metric_options.edge.workers)",
                self._threshold_note(),
                f"{self.workers} worker processes" if self.workers > 0 else "this process",
            )

    def _threshold_note(self) -> str:
        k, used = len(self.settings.thresholds), len(self.in_use)
        if used == k:
            return f"{k} thresholds"
        return f"{used} of the {k} thresholds (online_thresholds; final evaluations use all {k})"

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
        thresholds = tuple(self.settings.thresholds[i] for i in self.in_use)
        settings = replace(self.settings, thresholds=thresholds)
        if self._started is None:
            self._started = time.monotonic()
        if self.workers <= 0:
            job: Future | np.ndarray = batch_counts(edges, truths, settings)
        else:
            job = self._executor().submit(batch_counts, edges, truths, settings)
        self._pending.append((len(edges), job))

    def _executor(self) -> Executor:
        # fork where available: workers start at once and never re-import the main script; they
        # run only NumPy and pyedgeeval code, never torch (the same trade-off as DataLoader workers)
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=pool_worker_init
            )
        return self._pool

    def _collect(self) -> None:
        """Wait for the outstanding images (logging the progress) and add their counts to the
        states."""
        pending, self._pending = self._pending, []
        self._wait_for([(n, job) for n, job in pending if isinstance(job, Future)])
        for _, job in pending:
            counts = job.result() if isinstance(job, Future) else job  # [N, K in use, 4]
            self.counts[self.in_use] += torch.from_numpy(counts.sum(0)).to(self.counts)
            best = np.stack([best_threshold_counts(c) for c in counts]).sum(0)
            self.best_counts += torch.from_numpy(best).to(self.best_counts)
            self.images += counts.shape[0]
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if pending and self._started is not None:
            log.info(
                "edge odsF/oisF/AP: %d images matched at %s in %.0f s",
                sum(n for n, _ in pending),
                self._threshold_note(),
                time.monotonic() - self._started,
            )
        self._started = None

    def _wait_for(self, jobs: list[tuple[int, Future]]) -> None:
        """Wait for the workers' jobs (image count, job), logging how many images are matched,
        the rate since the first image was handed over and the time left, every
        ``PROGRESS_EVERY_S`` seconds."""
        remaining = {job: n for n, job in jobs}
        total = sum(remaining.values())
        started = self._started if self._started is not None else time.monotonic()
        while remaining:
            finished, _ = wait(list(remaining), timeout=PROGRESS_EVERY_S)
            for job in finished:
                del remaining[job]
            if not remaining:
                break
            left = sum(remaining.values())
            rate = (total - left) / max(time.monotonic() - started, 1e-9)
            log.info(
                "edge odsF/oisF/AP: %d of %d images matched (%.2f images/s), about %s left",
                total - left,
                total,
                rate,
                f"{left / rate:.0f} s" if rate > 0 else "an unknown time",
            )

    def sync(self, *args, **kwargs) -> None:  # collect local results before states are summed
        self._collect()
        super().sync(*args, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        self._collect()
        counts = self.counts.cpu().numpy()[self.in_use]
        scores = boundary_scores(counts, self.best_counts.cpu().numpy())
        return {name: torch.tensor(value) for name, value in scores.items()}

    def reset(self) -> None:
        for _, job in self._pending:
            if isinstance(job, Future):
                job.cancel()
        self._pending = []
        super().reset()

    def __getstate__(self) -> dict[str, Any]:  # a pool and futures cannot be pickled or copied
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_pool": None, "_pending": []}
