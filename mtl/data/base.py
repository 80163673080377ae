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

from mtl.data.checks import repeated_ids
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


def problem_of(path: Path, error: Exception) -> Problem:
    """The checker's report of what a reader refused, with the message the loader gives."""
    return Problem(str(path), str(error).removeprefix(f"{path}: "))


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
        check_ids: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.tasks = tuple(tasks)
        self.transform = transform if transform is not None else ToTensorNormalize()
        self.check_layout()
        self.ids = self.read_split(split, check_ids)

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

    def read_split(self, split: str, check_ids: bool = True) -> list[str]:
        """The ids of ``split``; one listed twice is a `DatasetError` unless not ``check_ids``
        (the checker reports it with the other problems instead)."""
        path = self.split_file(self.root, split)
        if not path.is_file():
            raise self.layout_error(f"split file not found: {path}")
        ids = read_id_list(path)
        if not ids:
            raise self.layout_error(f"split file lists no ids: {path}")
        if check_ids and (problem := repeated_ids(ids)) is not None:
            raise DatasetError(f"{self.NAME} split list {path}: {problem}")
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

