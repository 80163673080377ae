"""Boundary precision/recall with the benchmark's one-to-one pixel matching (NumPy, SciPy).

This module runs in worker processes, so it imports neither torch nor the rest of the package
(only its NumPy modules `mtl.metrics.thinning` and `mtl.metrics.matching`). The thinning tables,
the optional NMS and the reference matcher (``correspondPixels`` of the BSDS benchmark) come
from the ``pyedgeeval`` package (``pip install -e ".[edge]"``).

Per image and threshold t the edge probability map, quantised to uint8 as in the exported PNGs,
is binarised as ``q / 255 > t`` (SEISM's ``read_one_cont_png``), thinned, and matched to the
ground-truth boundary map within ``max_dist`` × image diagonal. The counts (matched ground truth
cntR, ground truth sumR, matched prediction cntP, prediction sumP) are summed over the dataset;
odsF is the F of the summed counts at the best single threshold, oisF the F of the counts summed
at each image's best threshold, AP the SEISM average precision of the summed curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255
#: Threshold set of SEISM's parameter file for HED (0.001, 0.01, ..., 0.99, 0.999).
HED_THRESHOLDS = (0.001, *(round(0.01 * i, 2) for i in range(1, 100)), 0.999)


def threshold_set(spec: int | str | Sequence[float]) -> np.ndarray:
    """Thresholds from a count (99 -> 0.01..0.99, like SEISM's parameter files), "hed" or a list."""
    if isinstance(spec, str):
        if spec != "hed":
            raise ValueError(f"edge thresholds '{spec}': expected a count, 'hed' or a list")
        return np.asarray(HED_THRESHOLDS, dtype=np.float64)
    if isinstance(spec, int):
        return np.round(np.arange(1, spec + 1) / (spec + 1), 6)
    return np.asarray(list(spec), dtype=np.float64)


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 as written to PNG (sigmoid × 255, truncated)."""
    return (np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)


def pyedgeeval_available() -> bool:
    """Whether the optional ``pyedgeeval`` package (and its OpenCV import) can be loaded."""
    try:
        import pyEdgeEval.preprocess  # noqa: F401
        from pyEdgeEval._lib import correspond_pixels  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class MatchSettings:
    """How boundaries are matched: tolerance, thresholds, thinning and NMS."""

    max_dist: float = 0.0075
    thresholds: tuple[float, ...] = tuple(threshold_set(99).tolist())
    thin: bool = True
    nms: bool = False


def image_counts(edge_uint8: np.ndarray, target: np.ndarray, settings: MatchSettings) -> np.ndarray:
    """Counts [K, 4] (cntR, sumR, cntP, sumP) of one image at every threshold.

    The thresholds are visited in increasing order: a threshold whose binary map equals the
    previous one's reuses its counts, the thinning re-examines only pixels next to a deletion
    (`mtl.metrics.thinning`), and the matching is solved exactly per independent component,
    re-solving only large components whose pixels changed (`mtl.metrics.matching`). The same
    counts as `reference_image_counts`, up to the random losses of its matcher.

    Args:
        edge_uint8: HxW uint8 edge probability × 255 (the exported PNG).
        target: HxW ground truth, 1 = boundary, 0 = none, 255 = ignore (counted as no boundary;
            predictions on ignored pixels are removed).
    """
    from mtl.metrics.matching import matched_count, tolerance
    from mtl.metrics.thinning import thin

    gt, strength = _prepared(edge_uint8, target, settings)
    tol = tolerance(*gt.shape, settings.max_dist)
    gt_total = int(gt.sum())
    counts = np.zeros((len(settings.thresholds), 4), dtype=np.int64)
    solved: dict[bytes, int] = {}
    previous: tuple[np.ndarray, np.ndarray] | None = None  # (binary map, its counts)
    for k in np.argsort(settings.thresholds, kind="stable"):
        predicted = strength > settings.thresholds[k]
        if previous is not None and np.array_equal(previous[0], predicted):
            counts[k] = previous[1]
            continue
        thinned = thin(predicted) if settings.thin else predicted
        matched = matched_count(thinned, gt, tol, solved) if gt_total and thinned.any() else 0
        counts[k] = (matched, gt_total, matched, int(thinned.sum()))
        previous = (predicted, counts[k])
    return counts


def _prepared(
    edge_uint8: np.ndarray, target: np.ndarray, settings: MatchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth boundary map and edge strength with ignored pixels removed (and NMS)."""
    ignore = target == IGNORE_INDEX
    gt = (target == 1) & ~ignore
    strength = edge_uint8.astype(np.float64) / 255.0
    if settings.nms:
        from pyEdgeEval.preprocess import fast_nms

        strength = fast_nms(strength)
    strength[ignore] = 0.0
    return gt, strength


def seed_matcher(seed: int) -> None:
    """Seed the random outlier edges of pyedgeeval's ``correspond_pixels`` (normally seeded from
    the clock when the library loads): the same seed before a call gives the same result."""
    import ctypes
    import importlib

    if seed <= 0:
        raise ValueError("the matcher's seed must be positive (0 seeds it from the clock)")
    library = ctypes.CDLL(importlib.import_module("pyEdgeEval._lib.correspond_pixels").__file__)
    stream = ctypes.c_char.in_dll(library, "_ZN6Random4randE")  # the global Random::rand
    reseed = library._ZN6Random6reseedEm  # Random::reseed(u_int64_t)
    reseed.argtypes, reseed.restype = [ctypes.c_void_p, ctypes.c_uint64], None
    reseed(ctypes.addressof(stream), seed)


def reference_image_counts(
    edge_uint8: np.ndarray, target: np.ndarray, settings: MatchSettings, seed: int | None = None
) -> np.ndarray:
    """`image_counts` the straightforward way, as SEISM does: every threshold thinned with
    pyedgeeval and matched with its ``correspond_pixels`` on the whole image. Kept as the
    reference of tests and ``python -m bench.edge``.

    Args:
        seed: seed the matcher's random outlier edges with it before every call (None: the
            clock-seeded stream, as SEISM).
    """
    from pyEdgeEval._lib import correspond_pixels
    from pyEdgeEval.preprocess import binary_thin

    gt, strength = _prepared(edge_uint8, target, settings)
    counts = np.zeros((len(settings.thresholds), 4), dtype=np.int64)
    previous: tuple[bytes, np.ndarray] | None = None
    for k, threshold in enumerate(settings.thresholds):
        predicted = strength > threshold
        key = predicted.tobytes()
        if previous is not None and previous[0] == key:  # same binary map: same counts
            counts[k] = previous[1]
            continue
        if settings.thin:
            predicted = binary_thin(predicted)
        if gt.any() and predicted.any():
            if seed is not None:
                seed_matcher(seed)
            match_pred, match_gt, _, _ = correspond_pixels(predicted, gt, settings.max_dist)
            counts[k] = ((match_gt > 0).sum(), gt.sum(), (match_pred > 0).sum(), predicted.sum())
        else:  # nothing to match: no correspondences
            counts[k] = (0, gt.sum(), 0, predicted.sum())
        previous = (key, counts[k].copy())
    return counts


def batch_counts(
    edges: Sequence[np.ndarray], targets: Sequence[np.ndarray], settings: MatchSettings
) -> np.ndarray:
    """Counts [N, K, 4] of several images (one job of the worker pool)."""
    return np.stack([image_counts(e, t, settings) for e, t in zip(edges, targets, strict=True)])


def precision_recall(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of counts [..., 4] with SEISM's rules for empty sums.

    No ground truth: recall 1, precision 0; then no prediction: recall 0, precision 1 (the
    order of SEISM's ``gather_measure``; either way F = 0).
    """
    cnt_r, sum_r, cnt_p, sum_p = (counts[..., i].astype(np.float64) for i in range(4))
    recall = np.where(sum_r > 0, cnt_r / np.maximum(sum_r, 1), 1.0)
    precision = np.where(sum_r > 0, cnt_p / np.maximum(sum_p, 1), 0.0)
    recall = np.where(sum_p > 0, recall, 0.0)
    precision = np.where(sum_p > 0, precision, 1.0)
    return precision, recall


def f_measure(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """F1, 0 where precision + recall is 0."""
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def best_threshold_counts(counts: np.ndarray) -> np.ndarray:
    """Counts [4] of one image at its best threshold (the first maximum of its F), for oisF."""
    return counts[int(np.argmax(f_measure(*precision_recall(counts))))]


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """SEISM's AP: precision interpolated linearly at recall 0, 0.01, ..., 1 inside the range of
    the curve (first occurrence of each recall value), summed and divided by 100."""
    recall_unique, first = np.unique(recall, return_index=True)
    if recall_unique.size < 2:
        return 0.0
    grid = np.linspace(0, 1, 101)
    inside = (grid >= recall_unique[0]) & (grid <= recall_unique[-1])
    return float(np.interp(grid[inside], recall_unique, precision[first]).sum() / 100)


def boundary_scores(dataset_counts: np.ndarray, best_counts: np.ndarray) -> dict[str, float]:
    """odsF, oisF and AP from counts summed over images: [K, 4] per threshold and [4] at each
    image's best threshold."""
    precision, recall = precision_recall(dataset_counts)
    ois_precision, ois_recall = precision_recall(best_counts)
    return {
        "odsF": float(f_measure(precision, recall).max()),
        "oisF": float(f_measure(ois_precision, ois_recall)),
        "ap": average_precision(precision, recall),
    }
