"""The LightningDataModule shared by every dataset."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import cv2
import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Subset

from mtl.data.base import DatasetError
from mtl.data.sampling import ResumableSampler, SeededSamples, carve, sample_seed
from mtl.data.skip import DeferBad, SkipBad, collate_deferring, collate_skipping
from mtl.job_signals import ignore_job_signals

DatasetFactory = Callable[..., Dataset]
log = logging.getLogger(__name__)


class MultiTaskDataModule(L.LightningDataModule):
    """Builds the train and validation splits of one dataset and their loaders.

    Args:
        dataset: partial, called as ``dataset(split=..., tasks=..., transform=...)``.
        tasks: the tasks to load.
        batch_size: the global batch size, split evenly over the processes.
        train_transform / val_transform: joint transforms for each split.
        prepare: optional callable run once per node before anything is loaded (e.g. generate
            the synthetic scenes).
        num_workers: loader worker processes per training process.
        check_files: how many evenly spaced samples of each split are checked at setup (files
            present, decodable, sizes and values sound; see ``mtl.data.verify``); 0 skips it.
        skip_bad: leave out samples whose files are bad instead of stopping, counted and
            reported per epoch (see ``mtl.data.skip``); the setup check then only warns.
        seed: seeds the training order and augmentation per (seed, epoch), see
            ``mtl.data.sampling`` (None: the seed of ``seed_everything``, else 0).
        gpu_augment: optional batch augmentation run on the device on training batches
            (``mtl.data.gpu_augment.BatchAugment``), seeded per (seed, epoch, batch, rank);
            ``train_transform`` then only decodes and pads.
        val_fraction: hold out this fraction of the training split (0: none), drawn with
            `val_seed`: training never sees it, ``holdout_dataloader`` serves it (evaluation
            transform) for choosing hyper-parameters without the reported val split.
    """

    def __init__(
        self,
        dataset: DatasetFactory,
        tasks: Sequence[str],
        batch_size: int,
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        prepare: Callable[[], object] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        check_files: int = 8,
        skip_bad: bool = False,
        seed: int | None = None,
        gpu_augment: Callable[..., dict] | None = None,
        val_fraction: float = 0.0,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        self.dataset_factory = dataset
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.train_transform = train_transform
        self.val_transform = val_transform
        self.prepare = prepare
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.splits = {"train": train_split, "val": val_split}
        self.check_files = check_files
        self.skip_bad = skip_bad
        self.datasets: dict[str, Dataset] = {}
        self.seed = seed
        self.gpu_augment = gpu_augment
        self.val_fraction, self.val_seed = float(val_fraction), int(val_seed)
        # (epoch, batches already trained in it) of the checkpoint being resumed, if any
        self._resume_position: tuple[int, int] | None = None

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def per_process_batch_size(self) -> int:
        world_size = self._world_size()
        if self.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by "
                f"the number of processes ({world_size})"
            )
        return self.batch_size // world_size

    def setup(self, stage: str | None = None) -> None:
        transforms = {"train": self.train_transform, "val": self.val_transform}
        for name, split in self.splits.items():
            if name not in self.datasets and (name == "val" or stage in (None, "fit")):
                dataset = self.dataset_factory(
                    split=split, tasks=self.tasks, transform=transforms[name]
                )
                spot_check = getattr(dataset, "spot_check", None)
                if spot_check is not None:
                    try:
                        spot_check(self.check_files)  # raises DatasetError with a report
                    except DatasetError as error:
                        if not self.skip_bad:
                            raise
                        log.warning("%s\n(data.skip_bad=true: bad samples are skipped)", error)
                if name == "train" and self.val_fraction > 0:
                    dataset = self._carve(dataset, split)
                self.datasets[name] = dataset

    def _carve(self, dataset: Dataset, split: str) -> Dataset:
        """`dataset` without the held-out samples, which become ``datasets["holdout"]``."""
        try:
            kept, held = carve(len(dataset), self.val_fraction, self.val_seed)
        except ValueError as error:
            raise DatasetError(f"data.val_fraction: {error}") from None
        whole = self.dataset_factory(split=split, tasks=self.tasks, transform=self.val_transform)
        self.datasets["holdout"] = Subset(whole, held)
        log.info("data.val_fraction=%s: %d training samples held out", self.val_fraction, len(held))
        return Subset(dataset, kept)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if self.num_workers > 0:
            # One OpenCV thread per worker: set here, before the workers are forked, because
            # OpenCV's thread pool cannot be reconfigured safely inside a forked child.
            cv2.setNumThreads(1)
        dataset, sampler = self.datasets[name], None
        if shuffle:
            dataset, sampler = self._resumable(dataset)
            self._check_one_batch(len(dataset), len(sampler))
        else:
            sampler = self._evaluation_sampler(dataset)
        collate = None
        if self.skip_bad:
            dataset, collate = SkipBad(dataset), collate_skipping
        elif self._world_size() > 1:
            # a bad sample reaches the step, where all processes stop on it together
            dataset, collate = DeferBad(dataset), collate_deferring
        return DataLoader(
            dataset,
            collate_fn=collate,
            batch_size=self.per_process_batch_size(),
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=partial(init_worker, rank=self._global_rank()),
        )

    def _check_one_batch(self, samples: int, share: int) -> None:
        """Refuse a training split that gives no full batch (`share`: this process's samples):
        Lightning would stop at once and the run would score an untrained model."""
        if share >= self.per_process_batch_size():
            return
        world_size = self._world_size()
        per_process = f" on each of {world_size} processes" if world_size > 1 else ""
        raise DatasetError(
            f"data.batch_size={self.batch_size}: the training split has {samples} samples, fewer "
            f"than one batch{per_process} (incomplete batches are dropped, so nothing would be "
            f"trained); set data.batch_size to at most {share * world_size}"
        )

    def _evaluation_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, each process evaluates a disjoint share (samples rank, rank + world, ...;
        shares may differ by one), so every sample is scored exactly once: Lightning's default
        DistributedSampler pads the last batch with repeated samples. Metric states are sums,
        so the synced scores equal one process's. None on one process (sequential order)."""
        world_size = self._world_size()
        if world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=world_size, rank=self._global_rank(), shuffle=False
        )

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    # ---------------------------------------------------------------- resumable order
    def _seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _resumable(self, dataset: Dataset) -> tuple[Dataset, ResumableSampler]:
        """The training split seeded per (seed, epoch, sample) and its sampler, positioned at
        the resumed checkpoint's epoch and batch (see ``mtl.data.sampling``)."""
        world_size = self._world_size()
        sampler = ResumableSampler(
            dataset, num_replicas=world_size, rank=self._global_rank(), seed=self._seed()
        )
        if self._resume_position is not None:
            epoch, batches = self._resume_position
            # Set now, not only at Lightning's set_epoch: Lightning creates the first iterator
            # (and, with workers, draws its first indices) before it calls set_epoch.
            sampler.set_epoch(epoch)
            sampler.skip(epoch, batches * self.per_process_batch_size())
            self._resume_position = None
        return SeededSamples(dataset, self._seed()), sampler

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data: the epoch and the batches trained in it (saved in
        checkpoints by Lightning, handed back to `load_state_dict` on resume)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        loop = trainer.fit_loop
        epochs = loop.epoch_progress.current
        # Lightning counts an epoch as processed at its end, before on_train_epoch_end (where
        # end-of-epoch checkpoints are saved); within an epoch (batch ends, validation inside the
        # epoch, signals) the epoch begun is not processed yet.
        if epochs.processed >= epochs.started:  # between epochs: the next starts at batch 0
            return {"epoch": int(epochs.processed), "batches": 0}
        epoch = int(epochs.processed)
        batches = int(loop.epoch_loop.batch_progress.current.processed)
        if batches >= trainer.num_training_batches:  # its last batch is trained
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" in state:
            self._resume_position = (int(state["epoch"]), int(state["batches"]))
            # Lightning warns on a mid-epoch resume unless the loader itself is stateful; the
            # sampler positioned above resumes exactly, so the warning does not apply.
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended before the epoch"
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches, once on the device: the ``gpu_augment`` augmentation, if any."""
        trainer = self.trainer
        if self.gpu_augment is None or trainer is None or not trainer.training:
            return batch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        index = batches * trainer.world_size + self._global_rank()  # one per (batch, rank)
        return self.gpu_augment(batch, seed=sample_seed(self._seed(), trainer.current_epoch, index))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def holdout_dataloader(self) -> DataLoader:
        """The samples `val_fraction` held out of the training split (after ``setup("fit")``)."""
        if "holdout" not in self.datasets:
            raise RuntimeError("no held-out split: set val_fraction > 0 and call setup('fit')")
        return self._loader("holdout", shuffle=False)


def init_worker(worker_id: int, rank: int = 0) -> None:
    """Loader worker start-up: one torch thread per worker (the workers are the parallelism;
    OpenCV's single thread is set by the parent before forking), then Lightning's per-worker
    seeding when ``seed_everything(workers=True)`` asked for it (a worker_init_fn of our own
    replaces Lightning's automatic one). Workers leave the job's stop signals to the training
    process (`mtl.job_signals`)."""
    ignore_job_signals()
    torch.set_num_threads(1)
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id, rank=rank)
