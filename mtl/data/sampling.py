"""Training-data order and augmentation that are a function of (seed, epoch) alone.

A resumed run must see the same batches, augmented the same way, as an uninterrupted one. The
default `DataLoader` shuffles with a seed drawn from the global RNG and seeds its workers from
it too, so both depend on the RNG state at the moment the loader is iterated, which a resume
does not reproduce (Lightning restores no RNG state). Here:

- `ResumableSampler` shuffles with a generator seeded by (seed, epoch) (it is a
  `DistributedSampler`, so Lightning leaves it in place under DDP and each rank takes its share)
  and can skip the samples an interrupted epoch already consumed, once;
- it yields ``(epoch, index)`` pairs, and `SeededSamples` seeds the torch RNG from
  (seed, epoch, index) around each sample's transform, so augmentation does not depend on the
  worker count, on which worker loads the sample, or on what ran before.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    value = (seed * 1_000_003 + epoch) * 2_147_483_647 + index
    return value % (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """Shuffled indices seeded by (seed, epoch), as ``(epoch, index)`` pairs.

    Args:
        dataset: the training split.
        num_replicas / rank: the process count and this process's rank.
        seed: the run's seed.
        drop_last: drop the tail that does not divide evenly over the processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip_epoch: int | None = None
        self._skip_samples = 0

    def skip(self, epoch: int, samples: int) -> None:
        """Leave out the first `samples` of this process's share of `epoch`, on the next pass
        over that epoch only (mid-epoch resume)."""
        self._skip_epoch, self._skip_samples = epoch, int(samples)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        if self._skip_epoch == self.epoch:
            indices = indices[self._skip_samples :]
            self._skip_epoch, self._skip_samples = None, 0
        epoch = self.epoch
        return iter([(epoch, index) for index in indices])


class SeededSamples(Dataset):
    """Loads ``dataset[index]`` for an ``(epoch, index)`` key with the torch RNG seeded from
    (seed, epoch, index), restoring the caller's RNG state afterwards. Plain integer keys (e.g.
    from a sampler Lightning substitutes for ``overfit_batches``) load without reseeding."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        # Reached only for attributes this wrapper lacks: expose the wrapped dataset's.
        # never a protocol method: a wrapped Subset's ``__getitems__`` would let the loader
        # fetch past this wrapper's ``__getitem__``
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            epoch, index = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                return self.dataset[index]
        return self.dataset[key]


def carve(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices ``0..size-1`` into (kept, held out): ``round(fraction * size)`` (at least
    one) drawn with a generator seeded by `seed` alone, so every run of one seed holds out the
    same samples; both lists in increasing order."""
    held = max(1, round(fraction * size))
    if not 0 < fraction < 1 or held >= size:
        raise ValueError(f"cannot hold out {fraction} of {size} samples and keep some to train")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[held:]), sorted(order[:held])
