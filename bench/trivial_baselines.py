"""Scores of trivial predictors on a dataset's validation split, next to a run's scores.

    python -m bench.trivial_baselines --root data/synthetic [--metrics outputs/.../metrics.json]

Trivial predictors, all fitted on the training split: the most frequent class everywhere
(semseg mIoU), the mean valid depth everywhere (depth RMSE) and the mean valid normal
everywhere (normals mean angle). Scores use the framework's own metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mtl.data.nyud import NYUDDataset
from mtl.metrics.depth import DepthRMSE
from mtl.metrics.normals import NormalsMeanAngle
from mtl.metrics.segmentation import SegmentationScores

TASKS = ("semseg", "depth", "normals")


def training_statistics(root: Path) -> dict[str, torch.Tensor]:
    """Most frequent class, mean valid depth and mean valid normal of the training split."""
    counts, depth_sum, depth_n, normal_sum = None, 0.0, 0, torch.zeros(3)
    for sample in NYUDDataset(root, "train", TASKS):
        labels = sample["semseg"][sample["semseg"] != 255]
        found = torch.bincount(labels, minlength=256)
        counts = found if counts is None else counts + found
        valid = sample["depth"] > 0
        depth_sum += float(sample["depth"][valid].sum())
        depth_n += int(valid.sum())
        normal_sum += sample["normals"].flatten(1).sum(dim=1)
    return {
        "class": counts.argmax(),
        "num_classes": torch.nonzero(counts).max() + 1,
        "depth": torch.tensor(depth_sum / depth_n),
        "normal": F.normalize(normal_sum, dim=0),
    }


def trivial_scores(root: Path) -> dict[str, float]:
    stats = training_statistics(root)
    num_classes = int(stats["num_classes"])
    seg, rmse, angle = SegmentationScores(num_classes), DepthRMSE(), NormalsMeanAngle()
    for sample in NYUDDataset(root, "val", TASKS):
        target = sample["semseg"][None]
        seg_pred = torch.full_like(target, int(stats["class"]))
        seg.update(F.one_hot(seg_pred, num_classes).permute(0, 3, 1, 2).float(), target)
        rmse.update(torch.full_like(sample["depth"], float(stats["depth"])), sample["depth"])
        normal = stats["normal"].view(1, 3, 1, 1).expand(1, 3, *sample["normals"].shape[-2:])
        angle.update(normal, sample["normals"][None])
    return {
        "val/semseg/mIoU": float(seg.compute()["mIoU"]),
        "val/depth/rmse": float(rmse.compute()),
        "val/normals/mean_angle": float(angle.compute()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--metrics", type=Path, help="a run's metrics.json to compare with")
    args = parser.parse_args()
    trivial = trivial_scores(args.root)
    run = json.loads(args.metrics.read_text()) if args.metrics else {}
    print("| score | trivial predictor | run | run / trivial |")
    print("|---|---|---|---|")
    for key, value in trivial.items():
        if key in run:
            print(f"| {key} | {value:.4f} | {run[key]:.4f} | {run[key] / value:.2f} |")
        else:
            print(f"| {key} | {value:.4f} | | |")


if __name__ == "__main__":
    main()
