"""Edge odsF/oisF/AP matching speed: ``python -m bench.edge [--quick]``.

Per image size, the same synthetic images are scored by the whole-image reference path
(`mtl.metrics.boundary.reference_image_counts`: every threshold thinned and matched with
pyedgeeval, as SEISM does; its matcher seeded) and by the path the metric uses
(`mtl.metrics.boundary.image_counts`), alternating image by image in one process on one core.
The table gives images per second per core of each, the speed-up, and the odsF/oisF/AP of both
on the same inputs: they differ only by the matched pixels the reference's random outlier edges
lose (last column).

Images: synthetic scenes (`mtl.data.synthetic.render_scene`) with their boundary ground truth;
predictions are the boundaries blurred (sigma 1.5 px) with smooth clutter, quantised to uint8
like the exported PNGs (a rough stand-in for a trained network's output).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import cv2
import numpy as np

from bench.table import Table

#: Images of PASCAL-Context's edge evaluation list and the node size of the projection.
PASCAL_EDGE_IMAGES, NODE_CORES = 2498, 16


@dataclass
class Settings:
    """Image sizes and counts, thresholds, tolerance and the matcher's seed."""

    sizes: tuple[tuple[int, int], ...] = ((96, 128), (375, 500))
    images: tuple[int, ...] = (8, 2)
    thresholds: int = 99
    max_dist: float = 0.0075
    seed: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(images=(4, 1))

    @classmethod
    def tiny(cls) -> Settings:
        """Seconds: for the test of the table."""
        return cls(sizes=((48, 64), (60, 80)), images=(1, 1), thresholds=9, max_dist=0.02)


def edge_inputs(size: tuple[int, int], count: int, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """(uint8 edge prediction, uint8 boundary ground truth) of ``count`` synthetic scenes."""
    from mtl.data.synthetic import render_scene

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        gt = render_scene(rng, size)["edge"]
        blur = cv2.GaussianBlur(gt.astype(np.float32), (0, 0), 1.5)
        clutter = cv2.GaussianBlur(rng.random(size).astype(np.float32), (0, 0), 2)
        probs = np.clip(2.5 * blur + 0.3 * clutter - 0.1, 0, 1)
        pairs.append(((probs * 255).astype(np.uint8), gt))
    return pairs


def edge_table(settings: Settings) -> Table:
    """Images/s per core of the reference and the metric's path, and their scores."""
    from mtl.metrics.boundary import (
        MatchSettings,
        best_threshold_counts,
        boundary_scores,
        image_counts,
        reference_image_counts,
        threshold_set,
    )

    match = MatchSettings(
        max_dist=settings.max_dist, thresholds=tuple(threshold_set(settings.thresholds).tolist())
    )
    paths = {
        "reference": lambda e, t: reference_image_counts(e, t, match, seed=settings.seed),
        "mtl": lambda e, t: image_counts(e, t, match),
    }
    warm = edge_inputs((24, 32), 1)[0]
    for path in paths.values():  # imports and caches outside the timings
        path(*warm)
    table = Table(
        f"Edge matching: images/s per core, {settings.thresholds} thresholds, "
        f"max_dist {settings.max_dist}",
        [
            "size",
            "images",
            "reference img/s",
            "mtl img/s",
            "speed-up",
            "odsF ref / mtl",
            "oisF ref / mtl",
            "AP ref / mtl",
            "matched px lost by ref",
        ],
    )
    for size, count in zip(settings.sizes, settings.images, strict=True):
        seconds = dict.fromkeys(paths, 0.0)
        counts: dict[str, list[np.ndarray]] = {name: [] for name in paths}
        for edge, gt in edge_inputs(size, count):
            for name, path in paths.items():  # alternating: a change of load hits both
                start = time.perf_counter()
                counts[name].append(path(edge, gt))
                seconds[name] += time.perf_counter() - start
        scores = {
            name: boundary_scores(
                np.sum(c, axis=0), np.sum([best_threshold_counts(x) for x in c], axis=0)
            )
            for name, c in counts.items()
        }
        matched = {name: int(np.sum(c, axis=0)[:, 0].sum()) for name, c in counts.items()}
        lost = matched["mtl"] - matched["reference"]
        table.rows.append(
            [
                f"{size[0]}x{size[1]}",
                count,
                count / seconds["reference"],
                count / seconds["mtl"],
                seconds["reference"] / seconds["mtl"],
                *(
                    f"{scores['reference'][k]:.4f} / {scores['mtl'][k]:.4f}"
                    for k in ("odsF", "oisF", "ap")
                ),
                f"{lost} of {matched['mtl']} ({100 * lost / max(matched['mtl'], 1):.2f}%)",
            ]
        )
    last_rate = table.rows[-1][3]
    table.notes = [
        f"One process, one thread; the reference's matcher seeded with {settings.seed} before "
        "every call. Matched pixels summed over thresholds and images. At the last size, "
        f"{PASCAL_EDGE_IMAGES} images on {NODE_CORES} cores would take about "
        f"{PASCAL_EDGE_IMAGES / last_rate / NODE_CORES / 60:.1f} min with mtl's path."
    ]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (about 2 minutes)")
    parser.add_argument("--max-dist", type=float, help="tolerance (PASCAL 0.0075, NYUD 0.011)")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.max_dist:
        settings.max_dist = args.max_dist
    print(edge_table(settings).markdown(), flush=True)


if __name__ == "__main__":
    main()
