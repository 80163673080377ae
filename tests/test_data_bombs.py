"""Files small on disk that decode to gigabytes are refused from their headers, quickly and
without the memory: a PNG/JPEG whose header claims 20000x20000 pixels, a ``.mat`` whose
compressed element inflates to hundreds of megabytes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from conftest import ROOT

from mtl.data.base import DatasetError
from mtl.data.formats import write_nyud, write_pascal
from mtl.data.io import DecodeError, read_mat
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset

SIZE = (24, 32)

#: Runs in a fresh interpreter (without torch, so it starts fast): read one file with a reader
#: of `mtl.data.io`, timing it and measuring the growth of the peak resident memory.
_PROBE = """
import json, resource, sys, time
from pathlib import Path
from mtl.data import io
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    getattr(io, sys.argv[1])(Path(sys.argv[2]))
    error = None
except io.DecodeError as caught:
    error = str(caught)
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"error": error, "seconds": seconds, "grown_mb": grown}))
"""


def _probe(reader: str, path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, reader, str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _zeros_deflated(count: int, chunk: int = 1 << 20, head: bytes = b"") -> bytes:
    """zlib stream of ``head`` then ``count`` zero bytes, built without holding them."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(head)]
    for start in range(0, count, chunk):
        parts.append(compressor.compress(bytes(min(chunk, count - start))))
    return b"".join(parts) + compressor.flush()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(path: Path, height: int, width: int) -> None:
    """A valid grey PNG of height x width zero pixels (about 1 KB per 1M pixels on disk)."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte, then the pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )  # fmt: skip


def _jpeg_claiming(path: Path, height: int, width: int) -> None:
    """A small JPEG whose frame header (SOF) is rewritten to claim height x width."""
    ok, encoded = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def _mat(path: Path, compressed: bytes) -> None:
    header = b"MATLAB 5.0 MAT-file, crafted".ljust(116, b" ") + bytes(8) + b"\x00\x01IM"
    path.write_bytes(header + struct.pack("<II", 15, len(compressed)) + compressed)


def _matrix_head(rows: int, cols: int, name: bytes = b"LabelMap") -> bytes:
    """The start of a uint8 rows x cols miMATRIX element, up to its data tag."""
    count = rows * cols
    name_field = struct.pack("<II", 1, len(name)) + name.ljust((len(name) + 7) // 8 * 8, b"\0")
    body = (
        struct.pack("<IIII", 6, 8, 9, 0)  # array flags: class mxUINT8
        + struct.pack("<IIii", 5, 8, rows, cols)  # dimensions
        + name_field
        + struct.pack("<II", 2, count)  # miUINT8 data
    )
    return struct.pack("<II", 14, len(body) + (count + 7) // 8 * 8) + body


def _assert_refused(result: dict, path: Path, what: str) -> None:
    assert result["error"] is not None and str(path) in result["error"], result
    assert what in result["error"], result
    assert result["seconds"] < 10.0, result  # a hang guard; the memory bound tells a decode apart
    assert result["grown_mb"] < 100, result


def _loader_refuses(dataset, path: Path, what: str) -> None:
    """The sample of ``path`` is a `DatasetError` naming it (skippable with data.skip_bad)."""
    with pytest.raises(DatasetError) as info:
        dataset[0]
    assert str(path) in str(info.value) and what in str(info.value), str(info.value)


@pytest.mark.parametrize("variant", ["atrc", "nyud_mt"])
def test_an_image_claiming_20000x20000_pixels_is_refused_from_its_header(tmp_path, variant):
    write_nyud(tmp_path, {"train": ["s0"], "val": ["v"]}, variant, SIZE)
    if variant == "atrc":
        path = tmp_path / "images" / "s0.png"
        _png_bomb(path, 20000, 20000)
        assert path.stat().st_size < 2_000_000
    else:
        path = tmp_path / "images" / "s0.jpg"
        _jpeg_claiming(path, 20000, 20000)
    _assert_refused(_probe("read_rgb", path), path, "20000x20000 pixels")
    _loader_refuses(NYUDDataset(tmp_path, "train", ["semseg"]), path, "20000x20000 pixels")


def test_a_label_png_claiming_more_pixels_than_allowed_is_refused(tmp_path):
    write_nyud(tmp_path, {"train": ["s0"], "val": ["v"]}, "atrc", SIZE)
    path = tmp_path / "segmentation" / "s0.png"
    _png_bomb(path, 12000, 12000)
    _assert_refused(_probe("read_label_png", path), path, "12000x12000 pixels")
    _loader_refuses(NYUDDataset(tmp_path, "train", ["semseg"]), path, "12000x12000 pixels")


def test_a_mat_of_compressed_zeros_is_refused_quickly(tmp_path):
    write_pascal(tmp_path, {"train": ["a"], "val": ["b"]}, SIZE)
    path = tmp_path / "pascal-context" / "trainval" / "a.mat"
    _mat(path, _zeros_deflated(256 << 20))
    assert path.stat().st_size < 400_000
    _assert_refused(_probe("read_mat", path), path, "holds a type 0 element")
    _loader_refuses(PASCALContextDataset(tmp_path, "train", ["edge"]), path, "cannot read .mat")


def test_a_mat_declaring_a_huge_array_is_refused_before_inflating_it(tmp_path):
    write_pascal(tmp_path, {"train": ["a"], "val": ["b"]}, SIZE)
    path = tmp_path / "pascal-context" / "trainval" / "a.mat"
    _mat(path, _zeros_deflated(16000 * 16000, head=_matrix_head(16000, 16000)))
    _assert_refused(_probe("read_mat", path), path, "more than the")
    # the loader allows a LabelMap 8 bytes per pixel of its 24x32 image (plus headers)
    _loader_refuses(PASCALContextDataset(tmp_path, "train", ["edge"]), path, "more than the")


def test_a_mat_within_the_cap_still_reads(tmp_path):
    """The cap is on inflation, not on compressed files: a real-sized compressed map reads."""
    labels = np.random.default_rng(0).integers(0, 460, (375, 500)).astype(np.uint16)
    path = tmp_path / "labels.mat"
    scipy.io.savemat(path, {"LabelMap": labels}, do_compression=True)
    assert np.array_equal(read_mat(path, max_bytes=8 * 375 * 500)["LabelMap"], labels)
    with pytest.raises(DecodeError, match="more than the 100000 allowed"):
        read_mat(path, max_bytes=100_000)


def test_a_mat_of_too_many_elements_is_refused(tmp_path):
    """Each element costs a Python step: a file of 40000 empty cells (a few KB) is refused
    instead of walked."""
    cells = np.empty((1, 40_000), dtype=object)
    cells[0, :] = [np.zeros((0, 0))] * 40_000
    path = tmp_path / "cells.mat"
    scipy.io.savemat(path, {"c": cells}, do_compression=True)
    assert path.stat().st_size < 100_000
    with pytest.raises(DecodeError, match="more than 32768 elements"):
        read_mat(path)
