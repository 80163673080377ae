"""NYUD-v2 multi-task dataset (semseg, depth, normals, edge; saliency where present).

Two releases exist and both are read, the variant detected per modality and per file from the
extensions present (so mixed folders work too)::

    <root>/images/<id>.jpg | <id>.png          RGB image (NYUD_MT: 480x640 .jpg; ATRC: 425x560 .png)
    <root>/segmentation/<id>.png               uint8, 0 = unlabeled, classes 1..40 (1..C)
    <root>/depth/<id>.npy                      float metres, 0 = invalid
    <root>/normals/<id>.npy | <id>.png         [-1, 1] floats | uint8 RGB (2 * v / 255 - 1)
    <root>/edge/<id>.npy | <id>.png            {0, 1} | uint8 0/255
    <root>/saliency/<id>.png                   uint8 0/255 (only the synthetic scenes have it)
    <root>/gt_sets/{train,val}.txt             one id per line (795 / 654 in the release)

Decoded (see ``mtl.data.transforms`` for the numpy sample contract): semseg 0 -> 255 (ignore)
and 1..C -> 0..C-1 (C = ``num_classes``: 40, or 5 for the synthetic scenes); normals
re-normalised to unit length, near-zero vectors -> zero (invalid; PNG normals stay uint8 until
``ToTensorNormalize`` decodes them); edge/saliency {0, 1}.
A file that cannot be decoded or holds impossible values (a label outside 0..C/255, depth that
is not float metres or is non-finite or negative, a valid normal far from unit length, a binary
value outside 0/1/255) is a ``DecodeError`` naming the file, never a silently repaired target.
The checker (``mtl.data.verify``) runs the same readers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from mtl.data.base import DatasetError, MultiTaskDataset, Problem, Sample, problem_of
from mtl.data.checks import (
    allowed_values,
    require_depth,
    require_size,
    require_unit,
    require_values,
)
from mtl.data.io import DecodeError, read_label_png, read_npy, read_rgb, read_rgb_png
from mtl.data.transforms import ENCODED_NORMAL_MIN_NORM, IGNORE_INDEX, lookup

NUM_CLASSES = 40
#: Length under which a float normal counts as "no normal".
NPY_NORMAL_MIN_NORM = 1e-6
#: How far from unit length a valid normal on disk may be (PNG quantisation is < 0.01).
NORMAL_TOLERANCE = 0.05

# Raw label -> training label: 0 (unlabeled) -> 255, c -> c - 1, 255 stays 255.
_SEMSEG_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_SEMSEG_LUT[1:255] = np.arange(254)


@lru_cache
def _semseg_allowed(num_classes: int) -> np.ndarray:
    if not 0 < num_classes < IGNORE_INDEX:  # labels are uint8 on disk, 255 = ignore
        raise DatasetError(
            f"data.num_classes.semseg: {num_classes}; expected 1..{IGNORE_INDEX - 1}"
        )
    return allowed_values((*range(num_classes + 1), IGNORE_INDEX))


# --------------------------------------------------------------------------- decoders


def _unsupported(path: Path) -> DecodeError:
    return DecodeError(f"unsupported file type for this modality: {path}")


def read_image(path: Path) -> np.ndarray:
    """RGB image (.jpg/.png) as uint8 HxWx3."""
    if path.suffix not in (".jpg", ".jpeg", ".png"):
        raise _unsupported(path)
    return read_rgb(path)


def read_semseg(path: Path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Segmentation (.png) as uint8 HxW: 0 -> 255 (ignore), 1..C -> 0..C-1, 255 stays 255
    (C = ``num_classes``). Raw values other than 0..C and 255 are a `DecodeError`."""
    if path.suffix != ".png":
        raise _unsupported(path)
    allowed = _semseg_allowed(num_classes)
    raw = require_values(read_label_png(path), allowed, path, "segmentation label")
    return lookup(_SEMSEG_LUT, raw)


def _plane(raw: np.ndarray, path: Path, what: str) -> np.ndarray:
    """An HxW (or HxWx1) array as HxW."""
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise DecodeError(f"{path}: expected an HxW {what} map, got shape {raw.shape}")
    return raw


def read_depth(path: Path) -> np.ndarray:
    """Depth (.npy, float metres) as float32 HxW (0 = invalid); integer or bool arrays and
    non-finite or negative values are a `DecodeError`."""
    if path.suffix != ".npy":
        raise _unsupported(path)
    depth = _plane(read_npy(path), path, "depth")
    require_depth(depth, path)
    return depth.astype(np.float32, copy=False)


def unit_normals(
    normals: np.ndarray, min_norm: float, norm: np.ndarray | None = None
) -> np.ndarray:
    """Re-normalise vectors; those shorter than ``min_norm`` become zero (invalid).
    ``norm``: their lengths, when already computed."""
    if norm is None:
        norm = np.sqrt(np.einsum("...c,...c->...", normals, normals))
    norm = norm[..., None]
    scale = np.where(norm >= min_norm, 1.0 / np.maximum(norm, min_norm), 0.0)
    return (normals * scale).astype(np.float32)


#: uint8 code -> squared normal component ``(2 * v / 255 - 1) ** 2``.
_SQUARED_CODES = (np.arange(256, dtype=np.float32) * np.float32(2 / 255) - np.float32(1)) ** 2


def encoded_normal_lengths(raw: np.ndarray) -> np.ndarray:
    """Length of each uint8-encoded normal, by table lookup (no float image is formed)."""
    squared = lookup(_SQUARED_CODES, raw)
    return np.sqrt(squared[..., 0] + squared[..., 1] + squared[..., 2])


def read_normals(path: Path) -> np.ndarray:
    """Normals: .npy floats in [-1, 1] -> float32 HxWx3 unit vectors (zero vector = invalid);
    .png -> its uint8 HxWx3 encoding ``2 * v / 255 - 1``, kept compact through the transforms
    and decoded by ``ToTensorNormalize`` (a pixel decoding to about zero length is invalid).
    A valid normal (not about zero) that is not unit length is a `DecodeError`."""
    if path.suffix == ".npy":
        normals = np.asarray(read_npy(path), dtype=np.float32)
        if normals.ndim != 3 or normals.shape[2] != 3:
            raise DecodeError(f"{path}: expected HxWx3 normals, got shape {normals.shape}")
        norm = np.sqrt(np.einsum("...c,...c->...", normals, normals))
        require_unit(norm, ~(norm < NPY_NORMAL_MIN_NORM), NORMAL_TOLERANCE, path)
        return unit_normals(normals, NPY_NORMAL_MIN_NORM, norm)
    if path.suffix == ".png":
        encoded = read_rgb_png(path)
        norm = encoded_normal_lengths(encoded)
        require_unit(norm, norm >= ENCODED_NORMAL_MIN_NORM, NORMAL_TOLERANCE, path)
        return encoded
    raise _unsupported(path)


_BINARY_ALLOWED = allowed_values((0, 1, 255))


def read_binary(path: Path) -> np.ndarray:
    """Binary map (edge/saliency) as uint8 HxW in {0, 1} (255 = ignore).

    .npy {0, 1} (255 = ignore) is kept; .png 0/255 is mapped to {0, 1} (a PNG holding 0/1 is
    kept). Any other value is a `DecodeError`.
    """
    if path.suffix == ".npy":
        raw = _plane(np.asarray(read_npy(path)), path, "binary")
        return require_values(raw, _BINARY_ALLOWED, path, "binary map").copy()
    if path.suffix == ".png":
        raw = require_values(read_label_png(path), _BINARY_ALLOWED, path, "binary map")
        if raw.max(initial=0) <= 1:
            return raw
        return (raw >= 128).astype(np.uint8)
    raise _unsupported(path)


# --------------------------------------------------------------------------- layout


class Modality(NamedTuple):
    """Where a modality lives, its allowed extensions (in order) and its decoder."""

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

LAYOUT = """\
  <root>/images/<id>.jpg (NYUD_MT) or <id>.png (ATRC/InvPT)
  <root>/segmentation/<id>.png     0 = unlabeled, 1..40 = classes
  <root>/depth/<id>.npy            metres, 0 = invalid
  <root>/normals/<id>.npy or .png  [-1, 1] floats, or uint8 RGB decoded as 2v/255-1
  <root>/edge/<id>.npy or .png     {0, 1}, or 0/255
  <root>/gt_sets/train.txt, val.txt   one id per line (795 / 654)"""


def find_file(root: Path, modality: Modality, sample_id: str) -> Path:
    """Path of ``sample_id`` in the modality's folder, trying each allowed extension.

    When none exists, the path with the first extension is returned (for error reports).
    """
    candidates = [root / modality.folder / f"{sample_id}{ext}" for ext in modality.extensions]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0]


def _alternatives(path: Path, modality: Modality) -> str:
    """``path`` and its other allowed extensions, for messages about a missing file."""
    return " or ".join(str(path.with_suffix(ext)) for ext in modality.extensions)


def _require(path: Path, modality: Modality, role: str, sample_id: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"missing {role} file for id {sample_id!r}: {_alternatives(path, modality)}"
        )
    return path


# --------------------------------------------------------------------------- dataset


class NYUDDataset(MultiTaskDataset):
    """NYUD-v2 (either release, or scenes written in its layout) as framework samples.

    ``num_classes``: the semseg classes (labels 1..C on disk; 40 for NYUD-v2, the synthetic
    scenes' config passes its 5); ``check_ids``: see `MultiTaskDataset.read_split`.
    """

    NAME = "NYUD-v2"
    LAYOUT = LAYOUT
    SPLIT_SIZES = {"train": 795, "val": 654}

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable[[Sample], Sample] | None = None,
        num_classes: int = NUM_CLASSES,
        check_ids: bool = True,
    ) -> None:
        self.num_classes = int(num_classes)
        _semseg_allowed(self.num_classes)  # a bad count fails here, not in a loader worker
        super().__init__(root, split, tasks, transform, check_ids)

    @classmethod
    def available_tasks(cls, root: str | Path) -> list[str]:
        return [task for task, modality in TASKS.items() if (Path(root) / modality.folder).is_dir()]

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        return root / "gt_sets" / f"{split}.txt"

    def required_folders(self) -> list[Path]:
        return [self.root / IMAGE.folder]

    def _modalities(self) -> dict[str, Modality]:
        return {"image": IMAGE, **{task: TASKS[task] for task in self.tasks}}

    def _reader(self, key: str) -> Callable[[Path], np.ndarray]:
        if key == "semseg":
            return partial(read_semseg, num_classes=self.num_classes)
        return self._modalities()[key].reader

    def files(self, sample_id: str) -> dict[str, Path]:
        return {
            key: find_file(self.root, modality, sample_id)
            for key, modality in self._modalities().items()
        }

    def load_sample(self, index: int) -> Sample:
        sample_id = self.ids[index]
        modalities = self._modalities()
        files = self.files(sample_id)
        sample: Sample = {
            key: self._reader(key)(_require(path, modalities[key], key, sample_id))
            for key, path in files.items()
        }
        size = sample["image"].shape[:2]
        for key in self.tasks:
            require_size(sample[key].shape, size, files[key], key, files["image"].name)
        sample["meta"] = self.meta(sample_id, size)
        return sample

    def missing_files(self, sample_id: str) -> list[Problem]:
        modalities = self._modalities()
        return [
            Problem(_alternatives(path, modalities[role]), f"missing ({role} of id {sample_id!r})")
            for role, path in self.files(sample_id).items()
            if not path.is_file()
        ]

    def sample_problems(self, sample_id: str) -> list[Problem]:
        """What the loader would refuse in each file of the sample (its readers, its rules)."""
        missing = self.missing_files(sample_id)
        if missing:
            return missing
        files = self.files(sample_id)
        problems: list[Problem] = []
        image_size = read_image(files["image"]).shape[:2]
        for task in self.tasks:
            path = files[task]
            try:
                decoded = self._reader(task)(path)
                require_size(decoded.shape, image_size, path, task, files["image"].name)
            except DecodeError as error:
                problems.append(problem_of(path, error))
        return problems
