"""Data-pipeline throughput: samples per second of the loaders, next to the training step rate.

    python -m bench.data [--quick] [--samples 24] [--repeats 3]

Writes NYUD-v2 (ATRC: 425x560 .png; NYUD_MT: 480x640 .jpg/.npy) and PASCAL_MT (375x500) folders
in their real formats to a temporary directory, then times one process with one thread (as a
loader worker runs) turning files into training tensors with random scale 0.5-2.0, crop
(448x576 NYUD, 512x512 PASCAL), flip, photometric distortion, normalisation:

- straightforward: Pillow/NumPy decoding to float32 arrays, every map rescaled whole with
  NumPy index arithmetic, then cropped, flipped, jittered in float, normalised;
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
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bench.models import NYUD_HEADS, PASCAL_HEADS, train_step, vit_model
from bench.table import Table
from bench.timing import median_seconds
from mtl.data.edges import label_edges
from mtl.data.formats import write_nyud, write_pascal
from mtl.data.gpu_augment import BatchAugment, decode_transforms
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset, read_context_labels, read_parts
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transforms

NYUD_TASKS = ("semseg", "depth", "normals", "edge")
PASCAL_TASKS = ("semseg", "parts", "sal", "normals", "edge")


# --------------------------------------------------------------------------- straightforward


def _pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _nearest(n_out: int, n_in: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def _bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    def axis(n_out: int, n_in: int):
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        low = np.floor(pos).astype(np.intp)
        return low, np.minimum(low + 1, n_in - 1), (pos - low).astype(np.float32)

    y0, y1, wy = axis(height, array.shape[0])
    x0, x1, wx = axis(width, array.shape[1])
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = array[y0][:, x0] * (1 - wx) + array[y0][:, x1] * wx
    bottom = array[y1][:, x0] * (1 - wx) + array[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _jitter(image: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation, hue (YIQ rotation) in float, each with p = 0.5."""
    gray = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if torch.rand(()) < 0.5:
        image = np.clip(image + float(torch.empty(()).uniform_(-32 / 255, 32 / 255)), 0, 1)
    if torch.rand(()) < 0.5:
        mean = float((image @ gray).mean())
        image = np.clip(mean + float(torch.empty(()).uniform_(0.5, 1.5)) * (image - mean), 0, 1)
    if torch.rand(()) < 0.5:
        luma = (image @ gray)[..., None]
        image = np.clip(luma + float(torch.empty(()).uniform_(0.5, 1.5)) * (image - luma), 0, 1)
    if torch.rand(()) < 0.5:
        angle = float(torch.empty(()).uniform_(-0.6, 0.6))
        yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = np.array(
            [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
        )
        image = np.clip(image @ (np.linalg.inv(yiq) @ rot @ yiq).T.astype(np.float32), 0, 1)
    return image.astype(np.float32)


def straightforward(sample: dict, crop: tuple[int, int]) -> dict:
    """Scale, crop (padding if small), flip, jitter, normalise a float sample; tensors out."""
    scale = float(torch.empty(()).uniform_(0.5, 2.0))
    height, width = sample["image"].shape[:2]
    new_h, new_w = round(height * scale), round(width * scale)
    out = {}
    for key, array in sample.items():
        if key == "image":
            out[key] = _bilinear(array, new_h, new_w)
        else:
            out[key] = array[_nearest(new_h, height)[:, None], _nearest(new_w, width)[None, :]]
    if "depth" in out:
        out["depth"] = out["depth"] / scale
    ch, cw = crop
    pad_h, pad_w = max(0, ch - new_h), max(0, cw - new_w)
    for key, array in out.items():
        fill = 0 if key in ("image", "depth", "normals") else 255
        widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
        out[key] = np.pad(array, widths, constant_values=fill)
    top = int(torch.randint(out["image"].shape[0] - ch + 1, ()))
    left = int(torch.randint(out["image"].shape[1] - cw + 1, ()))
    out = {key: array[top : top + ch, left : left + cw] for key, array in out.items()}
    if torch.rand(()) < 0.5:
        out = {key: np.ascontiguousarray(array[:, ::-1]) for key, array in out.items()}
        if "normals" in out:
            out["normals"][..., 0] *= -1
    out["image"] = (_jitter(out["image"]) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    tensors = {}
    for key, array in out.items():
        chw = array.transpose(2, 0, 1) if array.ndim == 3 else array[None]
        tensors[key] = torch.from_numpy(np.ascontiguousarray(chw))
    return tensors


def nyud_float_sample(dataset: NYUDDataset, sample_id: str) -> dict:
    files = dataset.files(sample_id)
    seg = _pil(files["semseg"]).astype(np.int64) - 1
    seg[seg < 0] = 255
    if files["normals"].suffix == ".png":
        normals = 2 * _pil(files["normals"]).astype(np.float32) / 255 - 1
    else:
        normals = np.load(files["normals"]).astype(np.float32)
    edge_path = files["edge"]
    edge = np.load(edge_path) if edge_path.suffix == ".npy" else _pil(edge_path) / 255
    return {
        "image": np.asarray(Image.open(files["image"]).convert("RGB"), np.float32) / 255,
        "semseg": seg,
        "depth": np.load(files["depth"]).astype(np.float32),
        "normals": normals,
        "edge": edge.astype(np.float32),
    }


def pascal_float_sample(dataset: PASCALContextDataset, sample_id: str) -> dict:
    files = dataset.files(sample_id)
    image = np.asarray(Image.open(files["image"]).convert("RGB"), np.float32) / 255
    context = read_context_labels(files["context"])
    parts = read_parts(files["parts"])
    if parts is None:
        parts = np.full(image.shape[:2], 255, np.uint8)
    normals = 2 * _pil(files["normals"]).astype(np.float32) / 255 - 1
    return {
        "image": image,
        "semseg": _pil(files["semseg"]).astype(np.int64),
        "parts": parts.astype(np.int64),
        "sal": (_pil(files["sal"]) / 255 > 0.5).astype(np.float32),
        "normals": normals * (context != 0)[..., None],
        "edge": label_edges(context).astype(np.float32),
    }


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
    """One written dataset, its float ("straightforward") reader, crop and model heads."""

    label: str
    dataset: Dataset
    float_sample: Callable
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
        setups.append(Setup(labels[variant], ds, nyud_float_sample, (448, 576), NYUD_HEADS))
    root = tmp / "pascal"
    write_pascal(root, {"train": ids}, persons=ids[::3])
    ds = PASCALContextDataset(root, "train", PASCAL_TASKS, train_transforms((512, 512)))
    label = "PASCAL_MT .jpg/.png/.mat 375x500"
    setups.append(Setup(label, ds, pascal_float_sample, (512, 512), PASCAL_HEADS))
    return setups


def samples_per_second(step: Callable[[int], object], n: int, repeats: int) -> float:
    """Samples/s of ``step(i)`` over ``n`` samples: median of ``repeats`` passes after one."""
    torch.manual_seed(0)
    return n / median_seconds(lambda: [step(i) for i in range(n)], repeats)


def pipeline_table(settings: Settings) -> Table:
    """One worker (one process, one thread): straightforward pipeline against this package's."""
    cv2.setNumThreads(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    table = Table(
        "Data: samples/s of one loader worker (one process, one thread)",
        ["data", "straightforward", "mtl", "speed-up", "mtl decode only"],
        notes=[
            "Decode only: what a worker does with data.gpu_augment=true (decode, pad to the "
            "crop, tensors; the augmentation runs on the GPU). Workers needed to feed a GPU: "
            "its training samples/s divided by this rate."
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for s in write_datasets(Path(tmp), settings.samples, settings.nyud_variants):
            ds = s.dataset
            plain = samples_per_second(
                lambda i, s=s: straightforward(s.float_sample(s.dataset, s.dataset.ids[i]), s.crop),
                len(ds),
                settings.repeats,
            )
            ours = samples_per_second(lambda i, ds=ds: ds[i], len(ds), settings.repeats)
            augment, ds.transform = ds.transform, decode_transforms(s.crop)
            decode = samples_per_second(lambda i, ds=ds: ds[i], len(ds), settings.repeats)
            ds.transform = augment
            table.rows.append([s.label, plain, ours, ours / plain, decode])
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
