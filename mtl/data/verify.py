"""Check a dataset folder without training.

    python -m mtl.data.verify --dataset nyud|pascal_context|synthetic --root DIR [--split train val]
        [--tasks semseg depth] [--limit N] [--workers N] [--allow-subset]
        [--edge-eval-list FILE]

Every listed id must have every file of every task; images and label maps must agree in size;
label values must be in range, depth finite and non-negative, normals unit length where valid;
split lists must have the official sizes and no duplicates, train and val no common id. These
are the loader's own readers and rules: what is reported here, training refuses too. Exit
status 0 when the folder is sound; otherwise a report naming each bad file and what is wrong
with it, and status 1 (2 when the folder itself or a split list is missing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mtl.data.base import DatasetError, MultiTaskDataset, Problem, format_report, read_id_list
from mtl.data.checks import repeated_ids
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset
from mtl.data.scenes import SyntheticScenes

DATASETS: dict[str, type[MultiTaskDataset]] = {
    "nyud": NYUDDataset,
    "pascal_context": PASCALContextDataset,
    "synthetic": SyntheticScenes,
}
#: Size of the edge evaluation subset (``test_new``) of PASCAL-Context val in the literature.
PASCAL_EDGE_EVAL_SIZE = 2498


def open_split(dataset: str, root: Path, split: str, tasks: Sequence[str]) -> MultiTaskDataset:
    """The dataset object of one split, set up for checking (raises ``DatasetError``)."""
    cls = DATASETS[dataset]
    options: dict[str, Any] = {"list_objects": False} if cls is PASCALContextDataset else {}
    return cls(root, split, tasks, check_ids=False, **options)  # repeated ids: a problem


def split_problems(datasets: dict[str, MultiTaskDataset], allow_subset: bool) -> list[Problem]:
    """Split-list problems: sizes against the official release, duplicates, train/val overlap."""
    problems: list[Problem] = []
    for split, ds in datasets.items():
        path = str(ds.split_file(ds.root, split))
        official = ds.SPLIT_SIZES.get(split)
        if official is not None and len(ds.ids) != official and not allow_subset:
            problems.append(
                Problem(path, f"{len(ds.ids)} ids, the official release has {official}")
            )
        if (repeated := repeated_ids(ds.ids)) is not None:  # the loader's rule
            problems.append(Problem(path, repeated))
    if "train" in datasets and "val" in datasets:
        common = sorted(set(datasets["train"].ids) & set(datasets["val"].ids))
        if common:
            val = datasets["val"]
            path = str(val.split_file(val.root, "val"))
            problems.append(Problem(path, f"{len(common)} ids also in train: {common[:8]}"))
    return problems


def edge_list_problems(path: Path, val: MultiTaskDataset) -> list[Problem]:
    """The edge evaluation list must be a subset of val (of 2498 ids in the literature)."""
    if not path.is_file():
        return [Problem(str(path), "edge evaluation list not found")]
    ids = read_id_list(path)
    outside = sorted(set(ids) - set(val.ids))
    problems = []
    if outside:
        problems.append(Problem(str(path), f"{len(outside)} ids not in val: {outside[:8]}"))
    if len(ids) != PASCAL_EDGE_EVAL_SIZE:
        problems.append(
            Problem(str(path), f"{len(ids)} ids; the literature's test_new list has 2498")
        )
    return problems


def _check_chunk(dataset: MultiTaskDataset, ids: Sequence[str]) -> list[Problem]:
    return dataset.check(ids)


def file_problems(dataset: MultiTaskDataset, ids: Sequence[str], workers: int) -> list[Problem]:
    """Problems of the files of ``ids``, checked by ``workers`` processes."""
    if workers <= 1 or len(ids) < 2 * workers:
        return dataset.check(ids)
    chunks = [ids[i : i + 32] for i in range(0, len(ids), 32)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_chunk, [dataset] * len(chunks), chunks)
        return [problem for chunk in results for problem in chunk]


def verify(
    dataset: str,
    root: str | Path,
    splits: Sequence[str] = ("train", "val"),
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    allow_subset: bool = False,
    edge_eval_list: str | Path | None = None,
) -> tuple[list[Problem], dict[str, int]]:
    """All problems of a dataset folder, and the number of ids checked per split.

    Raises ``DatasetError`` when the folder, a task's files or a split list are missing.
    """
    root = Path(root).expanduser()
    cls = DATASETS[dataset]
    if tasks is None:
        tasks = cls.available_tasks(root) if root.is_dir() else []
    datasets = {split: open_split(dataset, root, split, tasks) for split in splits}
    problems = split_problems(datasets, allow_subset)
    if edge_eval_list is not None and "val" in datasets:
        path = Path(edge_eval_list)
        problems += edge_list_problems(path if path.is_absolute() else root / path, datasets["val"])
    checked: dict[str, int] = {}
    for split, ds in datasets.items():
        ids = ds.ids[:limit] if limit else ds.ids
        problems += file_problems(ds, ids, workers)
        checked[split] = len(ids)
    return problems, checked


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--root", required=True, type=Path, help="the dataset folder")
    parser.add_argument("--split", nargs="+", default=["train", "val"], help="splits to check")
    parser.add_argument("--tasks", nargs="+", help="tasks to check (default: all found)")
    parser.add_argument("--limit", type=int, help="check only the first N ids of each split")
    parser.add_argument("--workers", type=int, default=1, help="processes checking files")
    parser.add_argument(
        "--allow-subset", action="store_true", help="accept split sizes other than the official"
    )
    parser.add_argument("--edge-eval-list", type=Path, help="PASCAL: the edge evaluation ids")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    name = DATASETS[args.dataset].NAME
    try:
        problems, checked = verify(
            args.dataset,
            args.root,
            splits=args.split,
            tasks=args.tasks,
            limit=args.limit,
            workers=args.workers,
            allow_subset=args.allow_subset,
            edge_eval_list=args.edge_eval_list,
        )
    except DatasetError as error:
        print(error, file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {n} ids" for split, n in checked.items())
    if problems:
        print(format_report(problems, f"{name} at {args.root} ({counts})", limit=len(problems)))
        return 1
    print(f"OK: {name} at {args.root} ({counts}): every file present and sound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
