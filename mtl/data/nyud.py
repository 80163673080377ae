"""NYUD-v2 multi-task dataset (semseg, depth, normals, edge, saliency).

Two on-disk variants are supported, detected per modality and per file from the extensions
present, so mixed layouts work too::

    <root>/images/<id>.jpg | <id>.png          RGB image
    <root>/segmentation/<id>.png               uint8, 0 = unlabeled, classes 1..C
    <root>/depth/<id>.npy                      float metres, 0 = invalid
    <root>/normals/<id>.npy | <id>.png         [-1, 1] floats | uint8 RGB (2 * v / 255 - 1)
    <root>/edge/<id>.npy | <id>.png            {0, 1} | uint8 0/255
    <root>/saliency/<id>.png                   uint8 0/255
    <root>/gt_sets/<split>.txt                 one id per line
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtl.data.transforms import IGNORE_INDEX, ToTensorNormalize

Sample = dict[str, Any]

#: Squared length under which a decoded PNG normal counts as "no normal".
_PNG_NORMAL_MIN_SQ_NORM = 0.25
#: Squared length under which a float normal counts as "no normal".
_NPY_NORMAL_MIN_SQ_NORM = 1e-12


# --------------------------------------------------------------------------- file readers


def _read_raw(path: Path) -> np.ndarray:
    """Raw array of a .npy or image file."""
    if path.suffix == ".npy":
        return np.load(path)
    with Image.open(path) as image:
        return np.asarray(image)


def _unsupported(path: Path) -> ValueError:
    return ValueError(f"unsupported file type for this modality: {path}")


def read_image(path: Path) -> np.ndarray:
    """RGB image (.jpg/.png) as float32 HxWx3 in [0, 1]."""
    if path.suffix not in (".jpg", ".png"):
        raise _unsupported(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def read_semseg(path: Path) -> np.ndarray:
    """Segmentation (.png) as int64 HxW: 0 -> 255 (ignore), 1..C -> 0..C-1, 255 stays 255."""
    if path.suffix != ".png":
        raise _unsupported(path)
    raw = _read_raw(path)
    if raw.ndim != 2:
        raise ValueError(f"expected a single-channel segmentation map, got {raw.shape}: {path}")
    labels = raw.astype(np.int64) - 1
    labels[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    return labels


def read_depth(path: Path) -> np.ndarray:
    """Depth (.npy, metres) as float32 HxW; non-finite values become 0 (invalid)."""
    if path.suffix != ".npy":
        raise _unsupported(path)
    depth = np.asarray(_read_raw(path), dtype=np.float32)
    depth = depth.reshape(depth.shape[:2])
    return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)


def _unit_normals(normals: np.ndarray, min_sq_norm: float) -> np.ndarray:
    """Re-normalise vectors; those shorter than sqrt(min_sq_norm) become zero (invalid)."""
    sq_norm = np.sum(normals * normals, axis=-1, keepdims=True)
    valid = sq_norm >= min_sq_norm
    scale = np.where(valid, 1.0 / np.sqrt(np.maximum(sq_norm, min_sq_norm)), 0.0)
    return (normals * scale).astype(np.float32)


def read_normals(path: Path) -> np.ndarray:
    """Normals as float32 HxWx3 unit vectors, zero vector = invalid.

    .npy holds floats in [-1, 1]; .png holds uint8 RGB decoded as ``2 * v / 255 - 1``, where
    a pixel decoding to (roughly) zero length is invalid.
    """
    if path.suffix == ".npy":
        normals = np.asarray(_read_raw(path), dtype=np.float32)
        return _unit_normals(normals, _NPY_NORMAL_MIN_SQ_NORM)
    if path.suffix == ".png":
        normals = 2.0 * np.asarray(_read_raw(path)[..., :3], dtype=np.float32) / 255.0 - 1.0
        return _unit_normals(normals, _PNG_NORMAL_MIN_SQ_NORM)
    raise _unsupported(path)


def read_binary(path: Path) -> np.ndarray:
    """Binary map (edge/saliency) as float32 HxW in {0, 1}.

    .npy is taken as is (values {0, 1}, 255 = ignore); .png 0/255 is thresholded at 128
    (a PNG already holding 0/1 is kept).
    """
    raw = _read_raw(path)
    if path.suffix == ".npy":
        return np.asarray(raw, dtype=np.float32).reshape(raw.shape[:2])
    if path.suffix == ".png":
        if raw.ndim == 3:
            raw = raw[..., 0]
        if raw.max(initial=0) <= 1:
            return raw.astype(np.float32)
        return (raw >= 128).astype(np.float32)
    raise _unsupported(path)


# --------------------------------------------------------------------------- layout


class Modality(NamedTuple):
    """Where a modality lives, which extensions it may use (in order) and how to read it."""

    folder: str
    extensions: tuple[str, ...]
    reader: Callable[[Path], np.ndarray]


IMAGE = Modality("images", (".jpg", ".png"), read_image)

#: Task name -> modality, in canonical task order.
TASKS = MappingProxyType(
    {
        "semseg": Modality("segmentation", (".png",), read_semseg),
        "depth": Modality("depth", (".npy",), read_depth),
        "normals": Modality("normals", (".npy", ".png"), read_normals),
        "edge": Modality("edge", (".npy", ".png"), read_binary),
        "sal": Modality("saliency", (".png",), read_binary),
    }
)


def find_file(root: Path, modality: Modality, sample_id: str) -> Path:
    """Path of ``sample_id`` in the modality's folder, trying each allowed extension."""
    candidates = [root / modality.folder / f"{sample_id}{ext}" for ext in modality.extensions]
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(path) for path in candidates)
    raise FileNotFoundError(f"missing file for id {sample_id!r}: expected {tried}")


def read_split(root: Path, split: str) -> list[str]:
    """Ids listed in ``<root>/gt_sets/<split>.txt`` (blank lines skipped)."""
    path = root / "gt_sets" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file lists no ids: {path}")
    return ids


def _check_folders(root: Path, tasks: Sequence[str]) -> None:
    """Raise for a missing image folder, unknown tasks or tasks whose folder is missing."""
    if not (root / IMAGE.folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {root / IMAGE.folder}")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(
                f"unknown task {task!r} for NYUD root {root}; known tasks: {list(TASKS)}"
            )
        folder = root / TASKS[task].folder
        if not folder.is_dir():
            raise ValueError(
                f"task {task!r} needs folder {folder}, which does not exist in NYUD root {root}"
            )


# --------------------------------------------------------------------------- dataset


class NYUDDataset(Dataset):
    """NYUD-v2 multi-task dataset returning the framework's sample contract.

    Each item is ``{"image", <task>..., "meta": {"id", "orig_size", "pad"}}``. ``transform``
    receives the numpy sample (see ``mtl.data.transforms``) and must return tensors; when
    it is None, only tensor conversion and ImageNet normalisation are applied.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.tasks = tuple(tasks)
        _check_folders(self.root, self.tasks)
        self.ids = read_split(self.root, split)
        self.transform = transform if transform is not None else ToTensorNormalize()
        self._check_files(self.ids[0])

    @staticmethod
    def available_tasks(root: str | Path) -> list[str]:
        """Tasks whose folders exist under ``root``, in canonical order."""
        return [task for task, modality in TASKS.items() if (Path(root) / modality.folder).is_dir()]

    def _modalities(self) -> dict[str, Modality]:
        return {"image": IMAGE, **{task: TASKS[task] for task in self.tasks}}

    def _check_files(self, sample_id: str) -> None:
        """Raise FileNotFoundError if any file of ``sample_id`` is missing."""
        for modality in self._modalities().values():
            find_file(self.root, modality, sample_id)

    def load_sample(self, index: int) -> Sample:
        """The untransformed numpy sample at ``index``."""
        sample_id = self.ids[index]
        sample: Sample = {
            key: modality.reader(find_file(self.root, modality, sample_id))
            for key, modality in self._modalities().items()
        }
        height, width = sample["image"].shape[:2]
        for key in self.tasks:
            if sample[key].shape[:2] != (height, width):
                raise ValueError(
                    f"{key} of id {sample_id!r} has size {sample[key].shape[:2]}, "
                    f"image has {(height, width)} (root {self.root})"
                )
        sample["meta"] = {
            "id": sample_id,
            "orig_size": (int(height), int(width)),
            "pad": (0, 0, 0, 0),
        }
        return sample

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | dict[str, Any]]:
        return self.transform(self.load_sample(index))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"tasks={list(self.tasks)}, n={len(self)})"
        )
