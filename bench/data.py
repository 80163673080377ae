"""Data-pipeline throughput: samples per second of one loader worker, two pipelines.

    python bench/data.py [--samples 24] [--seconds 6]

Writes NYUD-v2 (ATRC: 425x560 .png; NYUD_MT: 480x640 .jpg/.npy) and PASCAL_MT (375x500) folders
in their real formats to a temporary directory, then times one process with one thread (as a
loader worker runs) turning files into training tensors with random scale 0.5-2.0, crop
(448x576 NYUD, 512x512 PASCAL), flip, photometric distortion, normalisation:

- straightforward: Pillow/NumPy decoding to float32 arrays, every map rescaled whole with
  NumPy index arithmetic, then cropped, flipped, jittered in float, normalised;
- mtl: this package's loaders and transforms (OpenCV decoding, uint8 until the last step, the
  crop window chosen before resampling so only the window is resampled).

Both pipelines draw from the same seeds; the table prints samples/s and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from mtl.data.edges import label_edges
from mtl.data.formats import write_nyud, write_pascal
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


# --------------------------------------------------------------------------- timing


def throughput(step: Callable[[int], object], n: int, seconds: float) -> float:
    """Samples per second of ``step(i)`` cycling over ``n`` samples for about ``seconds``."""
    step(0)  # warm-up (imports, caches)
    torch.manual_seed(0)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done < n:
        step(done % n)
        done += 1
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="samples written per dataset")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per pipeline")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids = [f"{i:06d}" for i in range(args.samples)]
        setups = []
        for variant, label in (("atrc", "NYUD-v2 ATRC .png 425x560"),
                               ("nyud_mt", "NYUD-v2 NYUD_MT .jpg/.npy 480x640")):  # fmt: skip
            root = Path(tmp) / variant
            write_nyud(root, {"train": ids}, variant=variant)
            ds = NYUDDataset(root, "train", NYUD_TASKS, train_transforms((448, 576)))
            setups.append((label, ds, nyud_float_sample, (448, 576)))
        root = Path(tmp) / "pascal"
        write_pascal(root, {"train": ids}, persons=ids[::3])
        ds = PASCALContextDataset(root, "train", PASCAL_TASKS, train_transforms((512, 512)))
        setups.append(("PASCAL_MT .jpg/.png/.mat 375x500", ds, pascal_float_sample, (512, 512)))

        for label, ds, float_sample, crop in setups:
            plain = throughput(
                lambda i, ds=ds, f=float_sample, c=crop: straightforward(f(ds, ds.ids[i]), c),
                len(ds),
                args.seconds,
            )
            ours = throughput(lambda i, ds=ds: ds[i], len(ds), args.seconds)
            rows.append((label, plain, ours))

    print("samples/s of one loader worker (one process, one thread)\n")
    print("| data | straightforward | mtl | speed-up |")
    print("|---|---|---|---|")
    for label, plain, ours in rows:
        print(f"| {label} | {plain:.1f} | {ours:.1f} | {ours / plain:.2f}x |")


if __name__ == "__main__":
    main()
