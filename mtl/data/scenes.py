"""The generated synthetic scenes as a dataset: the NYUD-v2 layout and loader, with the scenes'
own classes (labels 1..5 on disk, 0 = unlabeled) and no official split sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from mtl.data.base import Sample
from mtl.data.nyud import NYUDDataset
from mtl.data.synthetic import CLASS_NAMES


class SyntheticScenes(NYUDDataset):
    """Scenes written by ``mtl.data.synthetic``; a label outside ``1..num_classes`` (0 and 255
    aside) is refused like any bad file."""

    NAME = "synthetic scenes"
    SPLIT_SIZES: ClassVar[dict[str, int]] = {}  # any number of scenes

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable[[Sample], Sample] | None = None,
        num_classes: int = len(CLASS_NAMES),
        check_ids: bool = True,
    ) -> None:
        super().__init__(root, split, tasks, transform, num_classes, check_ids)
