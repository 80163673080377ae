"""The InvPT / ATRC training pipeline, rewritten from its description for the data benchmark.

InvPT (Ye & Xu, ECCV 2022) and the methods built on it train NYUD-v2 and PASCAL-Context with
the transforms of ATRC (Brüggemann et al., ICCV 2021). What they do, per sample:

- decode with Pillow into float32 HxWxC arrays (image 0..255; NYUD semseg minus one with -1 as
  255; edge PNG / 255; normals PNG 2v/255 - 1; depth from .npy);
- rescale every map by s ~ U[0.5, 2.0] with OpenCV (image bilinear, labels nearest, depth / s);
- crop a random window, redrawn up to ten times until no semseg class covers 75 % of the
  labelled pixels (``np.unique`` counts);
- flip left-right with p = 0.5 (copying, normals' x negated);
- mmseg's photometric distortion (float -> uint8 per step, HSV round trips for saturation/hue);
- normalise in float32, pad to the crop (centred), mark invalid normals/depth as 255, tensors.

This module reproduces that work so that ``bench.data`` can time it next to mtl's loaders on the
same files; it is not used for training. Random draws come from torch's generator, so a seed
fixes them as it fixes mtl's.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from mtl.data.edges import label_edges
from mtl.data.pascal_context import read_context_labels, read_parts
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CROP_TRIES = 10
CAT_MAX_RATIO = 0.75
IGNORE = 255.0
#: Fill of each map when padded to the crop (the image black, depth 0, labels ignored).
PAD_FILL = {"image": 0.0, "depth": 0.0, "normals": 0.0}


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(high: int) -> int:
    """Uniform in [0, high] (both ends)."""
    return int(torch.randint(high + 1, ()))


def _pil_float(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32)


def _hwc(array: np.ndarray) -> np.ndarray:
    return array[..., None] if array.ndim == 2 else array


def nyud_sample(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """A NYUD-v2 sample as the InvPT (PNG) and ATRC (.jpg/.npy) loaders return it."""
    with Image.open(files["image"]) as image:
        sample = {"image": np.asarray(image.convert("RGB"), dtype=np.float32)}
    semseg = _pil_float(files["semseg"]) - 1
    semseg[semseg == -1] = IGNORE
    sample["semseg"] = _hwc(semseg)
    depth = files["depth"]
    sample["depth"] = _hwc(np.load(depth).astype(np.float32))
    normals = files["normals"]
    if normals.suffix == ".png":
        sample["normals"] = 2 * _pil_float(normals) / 255 - 1
    else:
        sample["normals"] = np.load(normals).astype(np.float32)
    edge = files["edge"]
    edges = _pil_float(edge) / 255 if edge.suffix == ".png" else np.load(edge).astype(np.float32)
    sample["edge"] = _hwc(edges)
    return sample


def pascal_sample(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """A PASCAL-Context sample in InvPT's arrays. Its .mat parsing is this package's readers
    (InvPT's loaders read the same .mat files with SciPy); the pixel work is InvPT's."""
    with Image.open(files["image"]) as image:
        sample = {"image": np.asarray(image.convert("RGB"), dtype=np.float32)}
    context = read_context_labels(files["context"])
    sample["semseg"] = _hwc(_pil_float(files["semseg"]))
    parts = read_parts(files["parts"])
    sample["parts"] = _hwc(
        np.full(context.shape, IGNORE, np.float32) if parts is None else parts.astype(np.float32)
    )
    sample["sal"] = _hwc((_pil_float(files["sal"]) / 255 > 0.5).astype(np.float32))
    sample["normals"] = (2 * _pil_float(files["normals"]) / 255 - 1) * (context != 0)[..., None]
    sample["edge"] = _hwc(label_edges(context).astype(np.float32))
    return sample


def _rescale(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    scale = _uniform(0.5, 2.0)
    out = {}
    for key, array in sample.items():
        height, width = array.shape[:2]
        size = (int(width * scale), int(height * scale))
        mode = cv2.INTER_LINEAR if key == "image" else cv2.INTER_NEAREST
        out[key] = _hwc(cv2.resize(np.squeeze(array), size, interpolation=mode))
        if key == "depth":
            out[key] /= scale
    return out


def _crop(sample: dict[str, np.ndarray], crop: tuple[int, int]) -> dict[str, np.ndarray]:
    height, width = sample["image"].shape[:2]
    if (height, width) == crop:
        return sample

    def window() -> tuple[int, int]:
        return _randint(max(height - crop[0], 0)), _randint(max(width - crop[1], 0))

    top, left = window()
    for _ in range(CROP_TRIES):
        labels, counts = np.unique(
            sample["semseg"][top : top + crop[0], left : left + crop[1]], return_counts=True
        )
        counts = counts[labels != IGNORE]
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
        top, left = window()
    return {k: a[top : top + crop[0], left : left + crop[1]] for k, a in sample.items()}


def _flip(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if float(torch.rand(())) >= 0.5:
        return sample
    out = {key: np.fliplr(array).copy() for key, array in sample.items()}
    if "normals" in out:
        out["normals"][..., 0] *= -1
    return out


def _saturate(array: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(array.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _photometric(image: np.ndarray) -> np.ndarray:
    """mmseg's distortion: brightness, contrast first or last, saturation, hue; p = 0.5 each."""
    image = image.astype(np.uint8)
    if float(torch.rand(())) < 0.5:
        image = _saturate(image, beta=_uniform(-32, 32))
    contrast_first = float(torch.rand(())) < 0.5
    if contrast_first and float(torch.rand(())) < 0.5:
        image = _saturate(image, alpha=_uniform(0.5, 1.5))
    if float(torch.rand(())) < 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _saturate(hsv[..., 1], alpha=_uniform(0.5, 1.5))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if float(torch.rand(())) < 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(torch.randint(-18, 18, ()))) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and float(torch.rand(())) < 0.5:
        image = _saturate(image, alpha=_uniform(0.5, 1.5))
    return image.astype(np.float32)


def _pad(array: np.ndarray, key: str, crop: tuple[int, int]) -> np.ndarray:
    height, width = array.shape[:2]
    delta_h, delta_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    if not delta_h and not delta_w:
        return array
    out = np.full((height + delta_h, width + delta_w, array.shape[2]),
                  PAD_FILL.get(key, IGNORE), dtype=np.float32)  # fmt: skip
    out[delta_h // 2 : delta_h // 2 + height, delta_w // 2 : delta_w // 2 + width] = array
    return out


def _mark_invalid(sample: dict[str, np.ndarray]) -> None:
    if "normals" in sample:
        normals = sample["normals"]
        normals[np.sqrt((normals**2).sum(-1)) == 0] = IGNORE
    if "depth" in sample:
        sample["depth"][sample["depth"] == 0] = IGNORE


def train_transform(sample: dict[str, np.ndarray], crop: tuple[int, int]) -> dict:
    """Scale, crop, flip, distort, normalise, pad, mark invalid pixels; CHW float tensors."""
    sample = _flip(_crop(_rescale(sample), crop))
    image = _photometric(sample["image"]) / 255
    sample["image"] = (image - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    sample = {key: _pad(array, key, crop) for key, array in sample.items()}
    _mark_invalid(sample)
    return {k: torch.from_numpy(a.transpose(2, 0, 1)).float() for k, a in sample.items()}
