"""Shared measurement helpers: median wall time after warm-up, and peak resident memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_paired_ratio(
    fn: Callable[[], object], reference: Callable[[], object], repeats: int = 5, warmup: int = 1
) -> float:
    """Median over ``repeats`` pairs of (time of ``fn`` / time of ``reference``), the two
    called back to back in each pair, after ``warmup`` untimed calls of each. Pairing keeps a
    change of load on the machine from landing on one side of the ratio only."""
    for _ in range(warmup):
        reference()
        fn()
    ratios = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        reference()
        middle = time.perf_counter()
        fn()
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return statistics.median(ratios)


def median_interval(stamps: list[float], skip: int = 1) -> float:
    """Median gap between consecutive time stamps, ignoring the first ``skip`` gaps."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][skip:]
    return statistics.median(gaps)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def exact_rss_accounting() -> bool:
    """Make freed large blocks go back to the OS at once (glibc: fixed 64 KiB mmap threshold),
    so that the resident set follows the live allocations. False where this is not glibc."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD


def peak_rss_growth_mib(fn: Callable[[], object]) -> float:
    """Peak resident set (Linux VmHWM) while ``fn`` runs, above the resident set before it, MiB.

    Call `exact_rss_accounting` once first; NaN where /proc is missing."""
    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current set
        before = _status_mib("VmRSS:")
    except OSError:
        return float("nan")
    fn()
    with contextlib.suppress(OSError):
        return _status_mib("VmHWM:") - before
    return float("nan")
