"""``data.skip_bad``: leave out samples whose files are bad, count them, report the count.

`SkipBad` turns a sample that raises `DatasetError` into None (with a warning naming the file);
`collate_skipping` drops the Nones and records how many it dropped in the batch under
``SKIPPED``, so the count travels from loader worker processes to the training process with
the batch itself. `SkippedSamples` sums the counts over each epoch (and over processes) and
logs ``data/skipped`` (training) and ``data/val_skipped`` (validation) plus a warning line.

A batch whose samples are all bad holds only ``SKIPPED``. Under DDP that process cannot take
part in the step's collectives, so the processes agree on it first (`mtl.data.agreement`) and
all of them skip the update.

Without ``data.skip_bad`` a bad sample stops the run. On one process the loader raises; under
DDP `DeferBad` and `collate_deferring` carry the error to the module in the batch (``BAD``),
so that every process learns of it at the same collective (the training step's, or the end
of an evaluation epoch) and all stop with the same message, instead of the others waiting in
a collective for a process that has died.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, default_collate

from mtl.data.base import DatasetError

log = logging.getLogger(__name__)

#: Batch key holding the number of samples dropped from the batch.
SKIPPED = "skipped"
#: Batch key holding the error message of a bad sample (the batch holds nothing else).
BAD = "bad_sample"


class SkipBad(Dataset):
    """A dataset whose bad samples (`DatasetError`) come out as None instead of raising."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DatasetError as error:
            log.warning("skipping a bad sample (data.skip_bad=true): %s", error)
            return None

    def __getattr__(self, name: str) -> Any:  # e.g. ``ids``, ``tasks`` of the wrapped dataset
        # never a protocol method: a wrapped Subset's ``__getitems__`` would let the loader
        # fetch past this wrapper's ``__getitem__``
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class BadSample(str):
    """The message of a sample that raised `DatasetError`, in place of the sample."""


class DeferBad(SkipBad):
    """A dataset whose bad samples come out as `BadSample` (their error message), so the
    error travels with the batch from loader workers to the training step."""

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except DatasetError as error:
            return BadSample(error)


def collate_deferring(samples: Sequence[Any]) -> dict[str, Any]:
    """`default_collate`, or ``{BAD: message}`` of the first `BadSample` when there is one."""
    bad = next((sample for sample in samples if isinstance(sample, BadSample)), None)
    return {BAD: str(bad)} if bad is not None else default_collate(samples)


def bad_sample(batch: Any) -> str | None:
    """The error message a deferred bad sample left in ``batch`` (None: no bad sample)."""
    return batch.get(BAD) if isinstance(batch, dict) else None


def collate_skipping(samples: Sequence[Any]) -> dict[str, Any]:
    """`default_collate` of the samples that are not None, plus ``SKIPPED``: how many were."""
    kept = [sample for sample in samples if sample is not None]
    batch = default_collate(kept) if kept else {}
    batch[SKIPPED] = torch.tensor(len(samples) - len(kept))
    return batch


def skipped_in(batch: Any) -> int:
    """The number of samples dropped from ``batch`` (0 for batches without the key)."""
    if isinstance(batch, dict) and SKIPPED in batch:
        return int(batch[SKIPPED])
    return 0


def is_empty(batch: Any) -> bool:
    """True for a batch from which every sample was dropped."""
    return isinstance(batch, dict) and "image" not in batch


class SkippedSamples(L.Callback):
    """Counts the samples left out per epoch; logs the totals over all processes."""

    def __init__(self) -> None:
        self.counts = {"train": 0, "val": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counts["train"] += skipped_in(batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.counts["val"] += skipped_in(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train", "data/skipped")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val", "data/val_skipped")
        self.counts["val"] = 0

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, key: str):
        local = torch.tensor(float(self.counts[split]), device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        self.counts[split] = 0
        pl_module.log(key, total, reduce_fx="sum")
        if total > 0:
            log.warning(
                "epoch %d: %d bad %s sample(s) skipped (data.skip_bad=true); the warnings above "
                "name the files; `python -m mtl.data.verify` checks the whole dataset",
                trainer.current_epoch,
                int(total),
                split,
            )
