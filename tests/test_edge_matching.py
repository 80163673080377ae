"""The fast edge matching against pyedgeeval: thinning, the matching's optimum, the sweep."""

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from mtl.metrics.boundary import (
    MatchSettings,
    image_counts,
    pyedgeeval_available,
    reference_image_counts,
    seed_matcher,
)

pytestmark = pytest.mark.skipif(
    not pyedgeeval_available(), reason="pyedgeeval not installed (pip install -e '.[edge]')"
)


def _blobs(rng: np.random.Generator, shape, sigma: float, level: float) -> np.ndarray:
    return gaussian_filter(rng.random(shape), sigma) > level


def _prediction(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """uint8 edge map: the boundaries blurred, plus smooth clutter."""
    probs = 2.5 * gaussian_filter(gt.astype(float), 1.2) + 0.5 * gaussian_filter(
        rng.random(gt.shape), 2
    )
    return (np.clip(probs - 0.25, 0, 1) * 255).astype(np.uint8)


def _boundaries(rng: np.random.Generator, shape) -> np.ndarray:
    """Boundaries of random smooth regions, 1 px wide."""
    regions = _blobs(rng, shape, 4, 0.5)
    edge = np.zeros(shape, dtype=np.uint8)
    edge[:-1] |= regions[:-1] != regions[1:]
    edge[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    return edge


def test_thinning_is_pyedgeeval_thinning():
    from pyEdgeEval.preprocess import binary_thin

    from mtl.metrics.thinning import thin

    rng = np.random.default_rng(0)
    for shape, sigma, level in [((23, 31), 1, 0.5), ((40, 60), 2, 0.45), ((64, 48), 3, 0.4)]:
        image = _blobs(rng, shape, sigma, level)
        assert np.array_equal(thin(image), binary_thin(image).astype(bool))
    assert not thin(np.zeros((5, 7), dtype=bool)).any()


def test_components_solved_apart_give_the_optimum_of_the_whole_problem():
    """Hopcroft-Karp on small components and per-component assignments sum to the minimum-cost
    assignment of the whole image, solved in one piece. Dense left halves, sparse right
    halves: at the larger tolerance both kinds of component occur in one image."""
    from mtl.metrics.matching import _assignment_count, _pairs, matched_count, tolerance

    rng = np.random.default_rng(1)

    def half_sparse() -> np.ndarray:
        image = _blobs(rng, (40, 60), 1, 0.52)
        image[:, 30:] &= rng.random((40, 30)) > 0.9
        return image

    for max_dist in (0.01, 0.05):
        for _ in range(3):
            pred, gt = half_sparse(), half_sparse()
            tol = tolerance(40, 60, max_dist)
            rows, cols, costs, _, _ = _pairs(pred, gt, tol)
            assert matched_count(pred, gt, tol) == _assignment_count(
                rows, cols, costs, 2 * tol.outlier
            )


def test_a_long_shifted_line_keeps_the_benchmark_s_optimum():
    """Ground truth and prediction on one row, the prediction one pixel further along. Pairing
    every pixel with its neighbour costs 100 each; pairing the overlap costs 0 and leaves two
    pixels out at ow = ceil(100 * 100 * maxDist) each. Short lines: all pixels paired; 300 px
    (30000 > 2 * 12000): two left out. The benchmark's own code agrees (seeded)."""
    from pyEdgeEval._lib import correspond_pixels

    from mtl.metrics.matching import matched_count, tolerance

    for length, expected in [(100, 100), (300, 299)]:
        height, width = 3, length + 3
        max_dist = 1.2 / math.hypot(height, width)  # maxDist 1.2 px: costs 0 or 100
        gt, pred = np.zeros((height, width), bool), np.zeros((height, width), bool)
        gt[1, 1 : 1 + length] = True
        pred[1, 2 : 2 + length] = True
        tol = tolerance(height, width, max_dist)
        assert matched_count(pred, gt, tol) == expected
        seed_matcher(1)
        match_pred, _, _, _ = correspond_pixels(pred, gt, max_dist)
        assert int((match_pred > 0).sum()) == expected


def test_the_sweep_gives_the_reference_counts_up_to_its_random_losses():
    """On boundary maps with clutter, at PASCAL's and NYUD's tolerance: the pixel sums equal,
    the matched pixels equal or above the (seeded) whole-image reference by its random losses,
    and the same counts whatever the order of the thresholds."""
    rng = np.random.default_rng(2)
    for max_dist in (0.0075, 0.011):  # 0.75 and 1.1 px
        gt = _boundaries(rng, (60, 80))
        edge = _prediction(rng, gt)
        settings = MatchSettings(max_dist=max_dist, thresholds=tuple(np.arange(1, 16) / 16))
        fast = image_counts(edge, gt, settings)
        reference = reference_image_counts(edge, gt, settings, seed=1)
        assert np.array_equal(fast[:, [1, 3]], reference[:, [1, 3]])
        lost = fast[:, 0] - reference[:, 0]
        assert lost.min() >= 0 and lost.max() <= 0.01 * fast[:, 0].max() + 1
        assert (fast[:, 0] > 0).all() and np.array_equal(fast[:, 0], fast[:, 2])
        backwards = MatchSettings(max_dist=max_dist, thresholds=settings.thresholds[::-1])
        assert np.array_equal(image_counts(edge, gt, backwards), fast[::-1])


def test_seeding_makes_the_reference_repeatable():
    rng = np.random.default_rng(3)
    gt = _boundaries(rng, (48, 64))
    edge = _prediction(rng, gt)
    settings = MatchSettings(thresholds=(0.2, 0.5))
    first = reference_image_counts(edge, gt, settings, seed=5)
    assert np.array_equal(reference_image_counts(edge, gt, settings, seed=5), first)
    with pytest.raises(ValueError, match="positive"):
        seed_matcher(0)
