"""Data-pipeline throughput: samples per second of the loaders, next to the training step rate.

    python -m bench.data [--quick] [--samples 24] [--repeats 3]

Writes NYUD-v2 (ATRC: 425x560 .png; NYUD_MT: 480x640 .jpg/.npy) and PASCAL_MT (375x500) folders
in their real formats to a temporary directory, then times one process with one thread (as a
loader worker runs) turning files into training tensors with random scale 0.5-2.0, crop
(448x576 NYUD, 512x512 PASCAL), flip, photometric distortion, normalisation:

- InvPT/ATRC: the training pipeline of InvPT and the methods built on it (Pillow decoding to
  float32, OpenCV rescaling of every map whole, crop, flip, mmseg's photometric distortion,
  normalisation and padding in float; `bench.invpt_pipeline`);
- mtl: this package's loaders and transforms (OpenCV decoding, uint8 until the last step, the
  crop window chosen before resampling so only the window is resampled).

Both pipelines draw from the same seeds; the first table prints samples/s and their ratio. The
second table runs this package's pipeline through a `DataLoader` with 0 and 2 worker processes
and puts the training step rate of ViT-S with the dataset's heads at the crop size (forward,
backward, AdamW; this machine, float32) beside it, so that one sees whether loading keeps up.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bench import invpt_pipeline as invpt
from bench.models import NYUD_HEADS, PASCAL_HEADS, train_step, vit_model
from bench.table import Table
from bench.timing import median_paired_ratio, median_seconds
from mtl.data.formats import write_nyud, write_pascal
from mtl.data.gpu_augment import BatchAugment, decode_transforms
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset
from mtl.data.transforms import train_transforms

NYUD_TASKS = ("semseg", "depth", "normals", "edge")
PASCAL_TASKS = ("semseg", "parts", "sal", "normals", "edge")


# --------------------------------------------------------------------------- benchmarks


@dataclass
class Settings:
    """Samples written per dataset, timing repetitions, loader batch and training batch."""

    samples: int = 24
    repeats: int = 3
    loader_batch: int = 2
    batches_per_repeat: int = 6
    train_batch: int = 2
    workers: tuple[int, ...] = (0, 2)
    nyud_variants: tuple[str, ...] = ("nyud_mt", "atrc")  # NYUD-v2 layouts of the first table

    @classmethod
    def quick(cls) -> Settings:
        return cls(samples=8, repeats=3, batches_per_repeat=4, train_batch=1)


@dataclass
class Setup:
    """One written dataset, its InvPT-style reader (files -> float arrays), crop and heads."""

    label: str
    dataset: Dataset
    invpt_sample: Callable[[dict[str, Path]], dict]
    crop: tuple[int, int]
    heads: dict[str, int]


def write_datasets(tmp: Path, samples: int, variants: tuple[str, ...] = ("nyud_mt", "atrc")):
    """NYUD-v2 (the given layouts) and PASCAL_MT folders with ``samples`` training ids each."""
    labels = {"atrc": "NYUD-v2 ATRC .png 425x560", "nyud_mt": "NYUD-v2 NYUD_MT .jpg/.npy 480x640"}
    ids = [f"{i:06d}" for i in range(samples)]
    setups = []
    for variant in variants:
        root = tmp / variant
        write_nyud(root, {"train": ids}, variant=variant)
        ds = NYUDDataset(root, "train", NYUD_TASKS, train_transforms((448, 576)))
        setups.append(Setup(labels[variant], ds, invpt.nyud_sample, (448, 576), NYUD_HEADS))
    root = tmp / "pascal"
    write_pascal(root, {"train": ids}, persons=ids[::3])
    ds = PASCALContextDataset(root, "train", PASCAL_TASKS, train_transforms((512, 512)))
    label = "PASCAL_MT .jpg/.png/.mat 375x500"
    setups.append(Setup(label, ds, invpt.pascal_sample, (512, 512), PASCAL_HEADS))
    return setups


def seeded_pass(step: Callable[[int], object], n: int) -> Callable[[], None]:
    """One pass of ``step(i)`` over ``n`` samples, the generator seeded with ``i`` before each,
    so that two pipelines drawing their scale first rescale sample ``i`` alike."""

    def run() -> None:
        for i in range(n):
            torch.manual_seed(i)
            step(i)

    return run


def samples_per_second(step: Callable[[int], object], n: int, repeats: int) -> float:
    """Samples/s of ``step(i)`` over ``n`` samples: median of ``repeats`` passes after one."""
    return n / median_seconds(seeded_pass(step, n), repeats)


def pipeline_table(settings: Settings) -> Table:
    """One worker (one process, one thread): InvPT/ATRC's pipeline against this package's."""
    cv2.setNumThreads(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    table = Table(
        "Data: samples/s of one loader worker (one process, one thread)",
        ["data", "InvPT/ATRC", "mtl", "speed-up", "mtl decode only"],
        notes=[
            "Speed-up: median over passes of the two pipelines run back to back (one pass: every "
            "sample once, with the same random scale in both). "
            "Decode only: what a worker does with data.gpu_augment=true (decode, pad to the "
            "crop, tensors; the augmentation runs on the GPU). Workers needed to feed a GPU: "
            "its training samples/s divided by this rate."
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for s in write_datasets(Path(tmp), settings.samples, settings.nyud_variants):
            ds = s.dataset

            def reference(i: int, s: Setup = s) -> dict:
                files = s.dataset.files(s.dataset.ids[i])
                return invpt.train_transform(s.invpt_sample(files), s.crop)

            def mtl(i: int, ds: Dataset = ds) -> dict:
                return ds[i]

            plain = samples_per_second(reference, len(ds), settings.repeats)
            ours = samples_per_second(mtl, len(ds), settings.repeats)
            speed_up = 1 / median_paired_ratio(
                seeded_pass(mtl, len(ds)), seeded_pass(reference, len(ds)), settings.repeats
            )
            augment, ds.transform = ds.transform, decode_transforms(s.crop)
            decode = samples_per_second(mtl, len(ds), settings.repeats)
            ds.transform = augment
            table.rows.append([s.label, plain, ours, speed_up, decode])
    torch.set_num_threads(threads)
    return table


def loader_rate(dataset: Dataset, workers: int, settings: Settings) -> float:
    """Samples/s of a `DataLoader` over ``dataset`` with ``workers`` processes, steady state."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 30)
    loader = DataLoader(
        dataset, batch_size=settings.loader_batch, sampler=sampler, num_workers=workers
    )
    batches = iter(loader)
    per_repeat = settings.batches_per_repeat
    seconds = median_seconds(
        lambda: list(itertools.islice(batches, per_repeat)), settings.repeats, warmup=1
    )
    return per_repeat * settings.loader_batch / seconds


def gpu_augment_rate(
    dataset: Dataset, workers: int, settings: Settings, crop: tuple[int, int]
) -> float:
    """Samples/s of decode-only workers, then transfer and ``BatchAugment`` on the GPU."""
    augment = BatchAugment(crop)
    sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 30)
    loader = DataLoader(
        dataset, batch_size=settings.loader_batch, sampler=sampler, num_workers=workers
    )
    batches = iter(loader)

    def step() -> None:
        for batch in itertools.islice(batches, settings.batches_per_repeat):
            batch = {k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}  # fmt: skip
            augment(batch)
        torch.cuda.synchronize()

    seconds = median_seconds(step, settings.repeats, warmup=1)
    return settings.batches_per_repeat * settings.loader_batch / seconds


def loader_table(settings: Settings) -> Table:
    """Loader samples/s (0 and 2 workers) next to ViT-S training samples/s, at the crop size."""
    cv2.setNumThreads(1)  # as the datamodule does before forking workers
    table = Table(
        "Data: loader throughput against the training step rate (samples/s)",
        [
            "data",
            "crop",
            *(f"loader, {w} workers" for w in settings.workers),
            "ViT-S train step",
            "loader / train (best)",
        ],
        notes=[
            f"Loader: decode + augmentation + collate, batch {settings.loader_batch}, "
            f"median of {settings.repeats} runs of {settings.batches_per_repeat} batches after "
            f"one; {torch.get_num_threads()} threads in the main process. ViT-S: random init, "
            f"HRNet heads, batch {settings.train_batch}, float32 on this machine's CPU."
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for s in write_datasets(Path(tmp), settings.samples, variants=("nyud_mt",)):
            rates = [loader_rate(s.dataset, w, settings) for w in settings.workers]
            model = vit_model("vit_small", s.crop, s.heads)
            g = torch.Generator().manual_seed(0)
            images = torch.randn(settings.train_batch, 3, *s.crop, generator=g)
            seconds = median_seconds(train_step(model, images), settings.repeats)
            train = settings.train_batch / seconds
            crop = f"{s.crop[0]}x{s.crop[1]}"
            table.rows.append([s.label, crop, *rates, train, max(rates) / train])
            if torch.cuda.is_available():  # data.gpu_augment: workers decode, the GPU augments
                s.dataset.transform = decode_transforms(s.crop)
                rates = [gpu_augment_rate(s.dataset, w, settings, s.crop) for w in settings.workers]
                row = [f"{s.label}, gpu_augment", crop, *rates, train, max(rates) / train]
                table.rows.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and repetitions")
    parser.add_argument("--samples", type=int, help="samples written per dataset")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    settings = Settings.quick() if args.quick else Settings()
    settings.samples = args.samples or settings.samples
    settings.repeats = args.repeats or settings.repeats
    print(pipeline_table(settings).markdown())
    print(loader_table(settings).markdown())


if __name__ == "__main__":
    main()
