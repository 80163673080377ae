"""How many boundary pixels the benchmark's one-to-one matching pairs, solved exactly (SciPy).

The BSDS ``correspondPixels`` code (``matchEdgeMaps``) matches predicted to ground-truth boundary
pixels within ``maxDist`` = ``max_dist`` × image diagonal by a minimum-cost assignment: a pair
costs ``rint(100 · distance)``, an unmatched pixel ``ow = ceil(100 · 100 · maxDist)``. It solves
that assignment with a cost-scaling solver over a graph to which it adds, per pixel, six
outlier edges drawn from a clock-seeded generator; the sparse random graph occasionally forces
a worse assignment (about 0.5% of the matches of a perfect prediction), which is why repeated
runs of the benchmark differ slightly.

Here the same assignment problem, with the same integer costs, is solved to its optimum and
split into what is independent:

* the problem separates into the connected components of the graph of pairs within
  ``maxDist``;
* in a component whose smaller side has fewer than ``2 ow / w_max`` pixels (``w_max``: its
  costliest pair), the optimum pairs as many pixels as possible: giving up one pair saves at
  most ``k · w_max`` with ``k`` ≤ the smaller side, less than the ``2 ow`` it costs. All those
  components are solved at once by a maximum-cardinality matching (Hopcroft-Karp);
* larger components are solved as minimum-cost assignments (SciPy's sparse LAPJV), each row of
  the smaller side either paired or left out at cost ``2 ow``, and remembered by their pixels,
  so an unchanged component at the next threshold is not solved again.

Only the matched count is used (cntR = cntP for a one-to-one matching). Written here because
pyedgeeval exposes only the randomised whole-image solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.sparse import coo_array, csr_array
from scipy.sparse.csgraph import (
    connected_components,
    maximum_bipartite_matching,
    min_weight_full_bipartite_matching,
)

#: ``correspond_pixels``' default outlier cost, a multiple of ``maxDist``.
OUTLIER_COST = 100.0


@dataclass(frozen=True)
class Tolerance:
    """The matching's geometry for one image size, in the benchmark's own arithmetic."""

    radius: float  # maxDist in pixels
    outlier: int  # cost of an unmatched pixel
    dy: np.ndarray  # offsets of the pairs within the radius
    dx: np.ndarray
    cost: np.ndarray  # their integer costs


@cache
def tolerance(height: int, width: int, max_dist: float) -> Tolerance:
    """``maxDist``, the outlier cost and the pair offsets for an image of this size, computed with
    the same double operations as ``correspond_pixels`` and ``matchEdgeMaps``."""
    diagonal = math.sqrt(height * height + width * width)
    radius = max_dist * diagonal
    outlier = math.ceil(OUTLIER_COST * max_dist * diagonal * 100)
    reach = math.ceil(radius)
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    squared = (dx * dx + dy * dy).astype(np.float64)
    inside = squared <= radius * radius  # matchEdgeMaps skips d2 > maxDist * maxDist
    cost = np.rint(np.sqrt(squared[inside]) * 100).astype(np.int64)
    return Tolerance(radius, outlier, dy[inside], dx[inside], cost)


def _pairs(pred: np.ndarray, gt: np.ndarray, tol: Tolerance) -> tuple[np.ndarray, ...]:
    """Every (prediction index, ground-truth index, cost) within the radius, and the pixels'
    flat positions."""
    height, width = pred.shape
    pred_at, gt_at = np.flatnonzero(pred), np.flatnonzero(gt)
    gt_id = np.full(pred.size, -1, dtype=np.int64)
    gt_id[gt_at] = np.arange(gt_at.size)
    rows, cols, offsets = [], [], []
    block = max(1, 2**20 // tol.dy.size)  # prediction pixels per step: bounded memory
    for start in range(0, pred_at.size, block):
        y, x = np.divmod(pred_at[start : start + block], width)
        yy, xx = y[:, None] + tol.dy, x[:, None] + tol.dx  # [prediction pixel, offset]
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        partner = np.where(inside, gt_id[np.where(inside, yy * width + xx, 0)], -1)
        row, offset = np.nonzero(partner >= 0)
        rows.append(start + row)
        cols.append(partner[row, offset])
        offsets.append(offset)
    if not rows:
        return (np.zeros(0, dtype=np.int64),) * 3 + (pred_at, gt_at)
    offset = np.concatenate(offsets)
    return np.concatenate(rows), np.concatenate(cols), tol.cost[offset], pred_at, gt_at


def _assignment_count(
    rows: np.ndarray, cols: np.ndarray, costs: np.ndarray, pair_saving: int
) -> int:
    """Pairs in the minimum-cost assignment of one component (``rows``, ``cols``: its pairs'
    local indices) where leaving a pair out costs ``pair_saving``."""
    n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
    if n_rows > n_cols:  # the smaller side as rows: every row is assigned
        rows, cols, n_rows, n_cols = cols, rows, n_cols, n_rows
    spare = np.arange(n_rows)  # row i may stay unpaired: its own extra column
    weights = np.concatenate([costs, np.full(n_rows, pair_saving)]) + 1  # SciPy: no zero weights
    graph = csr_array(
        (
            weights.astype(np.float64),
            (np.concatenate([rows, spare]), np.concatenate([cols, n_cols + spare])),
        ),
        shape=(n_rows, n_cols + n_rows),
    )
    _, assigned = min_weight_full_bipartite_matching(graph)
    return int((assigned < n_cols).sum())


def matched_count(
    pred: np.ndarray, gt: np.ndarray, tol: Tolerance, solved: dict[bytes, int] | None = None
) -> int:
    """Pixels paired by the optimum one-to-one matching of two boolean boundary maps.

    Args:
        solved: counts of large components already solved (for the thresholds of one image).
    """
    rows, cols, costs, pred_at, gt_at = _pairs(pred, gt, tol)
    if rows.size == 0:
        return 0
    n_pred, n_nodes = pred_at.size, pred_at.size + gt_at.size
    graph = coo_array((np.ones(rows.size), (rows, n_pred + cols)), shape=(n_nodes, n_nodes))
    count, component = connected_components(graph, directed=False)
    paired = np.zeros(n_nodes, dtype=bool)  # the pixels with a partner within the radius
    paired[rows] = True
    paired[n_pred + cols] = True
    pred_size = np.bincount(component[:n_pred], weights=paired[:n_pred], minlength=count)
    gt_size = np.bincount(component[n_pred:], weights=paired[n_pred:], minlength=count)
    pair_component = component[rows]
    costliest = np.zeros(count, dtype=np.int64)
    np.maximum.at(costliest, pair_component, costs)
    large = np.minimum(pred_size, gt_size) * costliest >= 2 * tol.outlier
    small = ~large[pair_component]
    matched = 0
    if small.any():
        biadjacency = csr_array(
            (np.ones(int(small.sum())), (rows[small], cols[small])), shape=(n_pred, gt_at.size)
        )
        matched += int((maximum_bipartite_matching(biadjacency, perm_type="column") >= 0).sum())
    if not large.any():
        return matched
    # the large components' pairs and pixels, grouped by component
    pair_order = np.argsort(pair_component, kind="stable")
    pair_start = np.searchsorted(pair_component[pair_order], np.arange(count + 1))
    node_order = np.argsort(np.where(paired, component, count), kind="stable")
    node_start = np.searchsorted(
        np.where(paired, component, count)[node_order], np.arange(count + 1)
    )
    position = np.concatenate([pred_at, gt_at + pred.size])  # distinct keys for both maps
    local = np.zeros(n_nodes, dtype=np.int64)
    for c in np.flatnonzero(large).tolist():
        nodes = node_order[node_start[c] : node_start[c + 1]]
        key = position[nodes].tobytes()
        if solved is not None and key in solved:
            matched += solved[key]
            continue
        is_pred = nodes < n_pred
        local[nodes[is_pred]] = np.arange(int(is_pred.sum()))
        local[nodes[~is_pred]] = np.arange(int((~is_pred).sum()))
        pairs = pair_order[pair_start[c] : pair_start[c + 1]]
        r, g = local[rows[pairs]], local[n_pred + cols[pairs]]
        found = _assignment_count(r, g, costs[pairs], 2 * tol.outlier)
        if solved is not None:
            solved[key] = found
        matched += found
    return matched
