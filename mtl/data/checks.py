"""The rules a dataset's files and split lists must follow: vectorised, one pass over the array.

Each raises ``DecodeError`` naming the file and what is wrong, so a damaged file fails loudly
instead of becoming a wrong training target. The loaders and the dataset checker
(``python -m mtl.data.verify``) run the same readers, so both refuse the same files with the
same message; the checker reports every problem instead of stopping at the first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mtl.data.io import DecodeError


def allowed_values(values: Iterable[int]) -> np.ndarray:
    """A bool lookup table over 0..255: True for the allowed values of a uint8 map."""
    table = np.zeros(256, dtype=bool)
    table[list(values)] = True
    return table


def _describe(values: np.ndarray) -> str:
    return str(np.unique(values)[:8].tolist())


def require_values(raw: np.ndarray, allowed: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``raw`` as uint8 if every value is allowed by the table ``allowed`` (from
    `allowed_values`); otherwise a `DecodeError` listing some offending values."""
    if raw.dtype != np.uint8:
        whole = raw.dtype.kind in "biu" or (
            raw.dtype.kind == "f" and np.array_equal(raw, np.round(raw))  # NaN: not whole
        )
        if not whole:
            raise DecodeError(f"{path}: expected integer {what} values, got {raw.dtype}")
        low, high = raw.min(initial=0), raw.max(initial=0)
        if low < 0 or high > 255:
            outside = raw[(raw < 0) | (raw > 255)]
            raise DecodeError(f"{path}: {what} values {_describe(outside)} outside 0..255")
        raw = raw.astype(np.uint8)
    bad = ~np.take(allowed, raw)
    if bad.any():
        allowed_list = np.flatnonzero(allowed)
        raise DecodeError(
            f"{path}: {what} values {_describe(raw[bad])} not allowed "
            f"(allowed: {_ranges(allowed_list)})"
        )
    return raw


def _ranges(values: np.ndarray) -> str:
    """``[0, 1, 2, 5]`` -> ``0..2, 5``."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def require_depth(depth: np.ndarray, path: Path) -> None:
    """Depth must be floats in metres, finite and non-negative (0 marks an invalid pixel).
    Integers (e.g. uint16 millimetres) or booleans are refused, not reinterpreted."""
    if depth.dtype.kind != "f":
        hint = " (millimetres? store metres as floats)" if depth.dtype.kind in "iu" else ""
        raise DecodeError(f"{path}: expected float depth in metres, got {depth.dtype}{hint}")
    finite = np.isfinite(depth)
    if not finite.all():
        raise DecodeError(f"{path}: {int((~finite).sum())} non-finite depth values")
    if depth.size and depth.min() < 0:
        raise DecodeError(
            f"{path}: {int((depth < 0).sum())} negative depth values (min {float(depth.min()):.3g})"
        )


def require_unit(norm: np.ndarray, valid: np.ndarray, tolerance: float, path: Path) -> None:
    """Where ``valid``, the normal length ``norm`` must be 1 within ``tolerance`` (and finite)."""
    off = valid & ~(np.abs(norm - 1.0) <= tolerance)  # NaN fails the comparison: off
    if off.any():
        lengths = norm[off]
        raise DecodeError(
            f"{path}: {int(off.sum())} of {int(valid.sum())} valid normals are not unit length "
            f"(|n| from {lengths.min():.3f} to {lengths.max():.3f}; tolerance {tolerance})"
        )


def require_size(
    shape: tuple[int, ...],
    image_shape: tuple[int, ...],
    path: Path,
    what: str,
    image: str | None = None,
) -> None:
    """A map's (H, W) must be its image's (the file named ``image``)."""
    if tuple(shape[:2]) != tuple(image_shape[:2]):
        named = f"the image {image}" if image else "the image"
        raise DecodeError(
            f"{path}: {what} has size {tuple(shape[:2])}, {named} has {tuple(image_shape[:2])}"
        )


def repeated_ids(ids: Sequence[str]) -> str | None:
    """What is wrong with a split list that names an id more than once, or None."""
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    return f"ids listed more than once: {repeated[:8]}" if repeated else None
