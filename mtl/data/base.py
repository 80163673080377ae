"""What every on-disk multi-task dataset shares: split lists, the sample contract, layout errors
and the per-file checks behind ``python -m mtl.data.verify`` and the datamodule's setup check."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl.data.io import DecodeError
from mtl.data.transforms import ToTensorNormalize

Sample = dict[str, Any]
README = "datasets/README.md"


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or holds bad files; the message says which."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file (or folder) and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def format_report(problems: Sequence[Problem], title: str, limit: int = 50) -> str:
    """A readable report: the title, then one line per problem (at most ``limit``)."""
    lines = [f"{title}: {len(problems)} problem(s)"]
    lines += [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def read_id_list(path: Path) -> list[str]:
    """Ids listed one per line in ``path`` (blank lines skipped)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- value checks
# Each returns a description of what is wrong with a raw (undecoded) array, or None.


def label_problem(raw: np.ndarray, max_label: int, void: int | None = 255) -> str | None:
    """Integer map whose values lie in 0..max_label (plus ``void``)."""
    if raw.ndim != 2:
        return f"expected a single-channel label map, got shape {raw.shape}"
    if not np.issubdtype(raw.dtype, np.integer):
        return f"expected integer labels, got {raw.dtype}"
    values = np.unique(raw)
    bad = values[(values < 0) | (values > max_label)]
    if void is not None:
        bad = bad[bad != void]
    if bad.size:
        allowed = f"0..{max_label}" + (f" or {void}" if void is not None else "")
        return f"label values {bad[:8].tolist()} outside {allowed}"
    return None


def depth_problem(raw: np.ndarray) -> str | None:
    """Depth in metres: finite and non-negative (0 = invalid)."""
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.floating):
        return f"expected a float HxW depth map, got {raw.dtype} {raw.shape}"
    if not np.isfinite(raw).all():
        return f"{int((~np.isfinite(raw)).sum())} non-finite depth values"
    if (raw < 0).any():
        return f"{int((raw < 0).sum())} negative depth values (min {float(raw.min()):.3g})"
    return None


def normals_problem(
    vectors: np.ndarray, tolerance: float, valid: np.ndarray | None = None
) -> str | None:
    """Decoded normals: unit length within ``tolerance`` where not (near) zero / where ``valid``."""
    if vectors.ndim != 3 or vectors.shape[2] != 3:
        return f"expected HxWx3 normals, got shape {vectors.shape}"
    if not np.isfinite(vectors).all():
        return "non-finite normal components"
    norm = np.sqrt((vectors.astype(np.float64) ** 2).sum(axis=2))
    mask = norm > 0.5 if valid is None else valid
    off = mask & (np.abs(norm - 1.0) > tolerance)
    if off.any():
        return (
            f"{int(off.sum())} of {int(mask.sum())} valid normals are not unit length "
            f"(|n| from {float(norm[off].min()):.3f} to {float(norm[off].max()):.3f})"
        )
    return None


def binary_problem(raw: np.ndarray, allowed: Iterable[int]) -> str | None:
    """Binary mask whose values lie in ``allowed``."""
    if raw.ndim != 2:
        return f"expected a single-channel mask, got shape {raw.shape}"
    allowed = sorted(set(allowed))
    bad = np.setdiff1d(np.unique(raw), allowed)
    if bad.size:
        return f"mask values {bad[:8].tolist()} outside {allowed}"
    return None


# --------------------------------------------------------------------------- dataset base


class MultiTaskDataset(Dataset, ABC):
    """A split of an on-disk dataset returning ``{"image", <task>..., "meta"}``.

    Subclasses name their layout and files and decode one sample; this class reads the split,
    applies the transform, and checks files. ``transform`` receives the numpy sample (see
    ``mtl.data.transforms``) and returns tensors; None means tensor conversion and ImageNet
    normalisation only.
    """

    #: Human-readable name, the expected folder layout, and the official split sizes.
    NAME: ClassVar[str]
    LAYOUT: ClassVar[str]
    SPLIT_SIZES: ClassVar[dict[str, int]]

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.tasks = tuple(tasks)
        self.transform = transform if transform is not None else ToTensorNormalize()
        self.check_layout()
        self.ids = self.read_split(split)

    # ------------------------------------------------------------ what subclasses provide
    @classmethod
    @abstractmethod
    def available_tasks(cls, root: str | Path) -> list[str]:
        """Tasks whose files exist under ``root``, in canonical order."""

    @classmethod
    @abstractmethod
    def split_file(cls, root: Path, split: str) -> Path:
        """The file listing the ids of ``split``."""

    @abstractmethod
    def files(self, sample_id: str) -> dict[str, Path]:
        """Every file the sample needs for the chosen tasks, by role (``image``, task, ...)."""

    @abstractmethod
    def load_sample(self, index: int) -> Sample:
        """The untransformed numpy sample at ``index``."""

    @abstractmethod
    def sample_problems(self, sample_id: str) -> list[Problem]:
        """Everything wrong with the files of one sample (missing, undecodable, bad values)."""

    def required_folders(self) -> list[Path]:
        """Folders that must exist for the chosen tasks."""
        return []

    # ------------------------------------------------------------ shared behaviour
    def layout_error(self, what: str) -> DatasetError:
        """An error naming the expected layout and where to read how to get the data."""
        return DatasetError(
            f"{self.NAME} dataset at '{self.root}': {what}.\n"
            f"Expected layout:\n{self.LAYOUT}\n"
            f"Set data.root to the folder holding it; see {README} for where to download "
            "the release and how to prepare it."
        )

    def check_layout(self) -> None:
        """Raise ``DatasetError`` if the root, a task or a required folder is missing."""
        if not self.root.is_dir():
            raise self.layout_error("folder not found")
        available = self.available_tasks(self.root)
        unknown = [t for t in self.tasks if t not in available]
        if unknown:
            raise self.layout_error(
                f"no files for task(s) {unknown}; tasks found in this folder: {available}"
            )
        missing = [str(p) for p in self.required_folders() if not p.is_dir()]
        if missing:
            raise self.layout_error(f"missing folder(s) {missing}")

    def read_split(self, split: str) -> list[str]:
        path = self.split_file(self.root, split)
        if not path.is_file():
            raise self.layout_error(f"split file not found: {path}")
        ids = read_id_list(path)
        if not ids:
            raise self.layout_error(f"split file lists no ids: {path}")
        return ids

    def missing_files(self, sample_id: str) -> list[Problem]:
        return [
            Problem(str(path), f"missing ({role} of id {sample_id!r})")
            for role, path in self.files(sample_id).items()
            if not path.is_file()
        ]

    def check(self, ids: Iterable[str]) -> list[Problem]:
        """Problems of the given ids' files; errors while reading are reported, not raised."""
        problems: list[Problem] = []
        for sample_id in ids:
            problems += self.check_one(sample_id)
        return problems

    def check_one(self, sample_id: str) -> list[Problem]:
        """Problems of one id's files; errors while reading are reported, not raised."""
        try:
            return self.sample_problems(sample_id)
        except DecodeError as error:
            return [Problem(f"id {sample_id!r}", str(error))]
        except Exception as error:  # a checker reports whatever a malformed file triggers
            return [Problem(f"id {sample_id!r}", f"{type(error).__name__}: {error}")]

    def spot_check(self, count: int) -> None:
        """Check ``count`` evenly spaced samples; raise ``DatasetError`` with the report."""
        if count <= 0:
            return
        picks = np.unique(np.linspace(0, len(self.ids) - 1, min(count, len(self.ids))).round())
        problems = self.check(self.ids[int(i)] for i in picks)
        if problems:
            title = f"{self.NAME} '{self.split}' split at '{self.root}' has bad files"
            raise DatasetError(
                format_report(problems, title)
                + f"\nRun `python -m mtl.data.verify --dataset ... --root {self.root}` for a "
                f"full check; see {README}."
            )

    def meta(self, sample_id: str, size: tuple[int, int]) -> dict[str, Any]:
        return {"id": sample_id, "orig_size": (int(size[0]), int(size[1])), "pad": (0, 0, 0, 0)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | dict[str, Any]]:
        return self.transform(self.load_checked(index))

    def load_checked(self, index: int) -> Sample:
        """`load_sample`, with every failure to read or accept a file a `DatasetError` that
        names the sample and the file (a missing, truncated or undecodable file, a map of the
        wrong size, a value out of range)."""
        try:
            return self.load_sample(index)
        except DatasetError:
            raise
        except (DecodeError, OSError) as error:
            raise DatasetError(f"{self.NAME} sample {self.ids[index]!r}: {error}") from error
        except Exception as error:  # a damaged file can trip any decoder: name every file
            files = ", ".join(str(path) for path in self.files(self.ids[index]).values())
            raise DatasetError(
                f"{self.NAME} sample {self.ids[index]!r}: {type(error).__name__}: {error} "
                f"(files: {files})"
            ) from error

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"tasks={list(self.tasks)}, n={len(self)})"
        )


def size_problem(
    path: Path, shape: tuple[int, ...], image_shape: tuple[int, int]
) -> Problem | None:
    """A problem if a map's (H, W) differs from the image's."""
    if tuple(shape[:2]) != tuple(image_shape):
        return Problem(str(path), f"size {tuple(shape[:2])} differs from the image's {image_shape}")
    return None
