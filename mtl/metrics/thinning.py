"""pyedgeeval's ``binary_thin``, computed only where the image can still change (NumPy only).

The benchmark path thins each binarised edge map with pyedgeeval's port of MATLAB's
``bwmorph(..., 'thin', Inf)``: repeated pairs of parallel sub-iterations, each computing every
pixel's 3x3 neighbourhood code over the whole image and deleting the pixels its lookup table
marks, until a sub-iteration deletes nothing. Most pixels are settled after the first pass, so
the whole-image passes mostly recompute codes that cannot have changed. This module gives the
same result with the same tables and the same stopping rule, but after the first pass only
re-examines the foreground pixels next to a deletion made since that table last looked at them
(a kept pixel whose neighbourhood is unchanged stays kept). Written here because neither
pyedgeeval nor scikit-image offers an incremental thinning with pyedgeeval's stopping rule.
"""

from __future__ import annotations

from functools import cache

import numpy as np

#: (dy, dx) of bit 0..8 of the 3x3 neighbourhood code (pyedgeeval's layout: NW = 1, N = 2,
#: NE = 4, W = 8, centre = 16, E = 32, SW = 64, S = 128, SE = 256).
_BITS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


@cache
def _deletion_tables() -> tuple[np.ndarray, np.ndarray]:
    """The codes each sub-iteration deletes: pyedgeeval's own tables, so the result is its."""
    from pyEdgeEval.preprocess.thin.thin import (
        _lut_mutate_mask,
        _thin_iter_1_lut,
        _thin_iter_2_lut,
    )

    return _lut_mutate_mask(_thin_iter_1_lut()), _lut_mutate_mask(_thin_iter_2_lut())


def thin(image: np.ndarray) -> np.ndarray:
    """Exactly ``pyEdgeEval.preprocess.binary_thin(image)`` of a 2-D boolean image."""
    height, width = image.shape
    stride = width + 2
    padded = np.zeros((height + 2, stride), dtype=bool)
    padded[1:-1, 1:-1] = image
    flat = padded.ravel()
    bytes_ = flat.view(np.uint8)
    offsets = np.array([dy * stride + dx for dy, dx in _BITS])
    neighbours = offsets[offsets != 0]
    tables = _deletion_tables()
    slot = np.zeros(flat.size, dtype=np.int64)  # scratch for removing repeated indices

    def distinct(indices: np.ndarray) -> np.ndarray:
        """``indices`` without repeats, in linear time (``np.unique`` sorts)."""
        order = np.arange(indices.size)
        slot[indices] = order
        return indices[slot[indices] == order]

    # pixels each table has to (re)examine: at first every foreground pixel
    pending = [np.flatnonzero(flat), np.flatnonzero(flat)]
    step = 0
    while True:
        which = step % 2
        candidates = pending[which]
        candidates = candidates[flat[candidates]]
        codes = np.zeros(candidates.size, dtype=np.int16)
        for bit, offset in enumerate(offsets.tolist()):
            codes |= bytes_[candidates + offset].astype(np.int16) << bit
        deleted = candidates[tables[which][codes]]
        if deleted.size == 0:  # pyedgeeval stops at the first sub-iteration without a change
            break
        flat[deleted] = False  # parallel: every code above was computed before deleting
        touched = (deleted[:, None] + neighbours).ravel()
        touched = distinct(touched[flat[touched]])
        pending[which] = touched
        other = pending[1 - which]
        pending[1 - which] = distinct(np.concatenate([other[flat[other]], touched]))
        step += 1
    return padded[1:-1, 1:-1].copy()
