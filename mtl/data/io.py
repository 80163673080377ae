"""File decoders shared by the dataset readers: images, PNG maps, ``.npy`` arrays, ``.mat`` files.

Images are decoded with OpenCV (libjpeg-turbo / libpng, no Python-level copies) and returned as
RGB uint8, grey label PNGs too; palette label PNGs (as PASCAL VOC's) go through Pillow, because
OpenCV expands palettes to colours instead of returning the indices. Where pyspng is installed
(extra ``fastpng``), libspng decodes the 8-bit grey and colour PNGs instead.
Before any decoder runs, the pixel count in the file's header (PNG IHDR, JPEG SOF) is checked
against `MAX_PIXELS`: a file of a few kilobytes can claim 20000x20000 pixels, and the decoders
would allocate all of them.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io
from PIL import Image

try:
    import pyspng as _pyspng  # optional (extra "fastpng"): faster 8-bit PNG decoding
except ImportError:
    _pyspng = None


class DecodeError(ValueError):
    """A file exists but cannot be decoded as the expected kind of array."""


#: OpenCV >= 4.10 decodes straight to RGB; older versions decode BGR, converted after.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


#: How far from the end of a file its end marker is looked for (trailing padding is allowed).
_TAIL = 1024

#: Largest image or map decoded (8192 x 4096): the datasets' images are under 1 megapixel; a
#: header claiming more is refused before decoding (a decompression bomb).
MAX_PIXELS = 1 << 25
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic), which carry the size.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DecodeError(f"cannot read file: {path} ({error})") from None


def truncation_problem(data: np.ndarray) -> str | None:
    """Why the encoded JPEG/PNG bytes look cut short (no end marker), or None.

    OpenCV decodes a truncated JPEG with only a warning, filling the missing rows grey; the
    end marker (JPEG EOI, PNG IEND) is what tells a complete file from a cut one.
    """
    head, tail = data[:8].tobytes(), data[-_TAIL:].tobytes()
    if head.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG"):
        end = tail.rfind(b"IEND")  # the chunk type, then its 4-byte CRC
        return None if 0 <= end <= len(tail) - 8 else "truncated PNG (no complete IEND chunk)"
    return None


def header_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(H, W) from the header of encoded PNG (IHDR) or JPEG (SOF) bytes; None for other formats
    or a header too short to say (the decoder then reports the file)."""
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG") and len(data) >= 24 and bytes(data[12:16]) == b"IHDR":
        width, height = struct.unpack(">II", bytes(data[16:24]))
        return height, width
    if not head.startswith(b"\xff\xd8"):
        return None
    pos = 2  # walk the marker segments up to the frame header (a handful per file)
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = int(data[pos + 1])
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int(data[pos + 2]) << 8 | int(data[pos + 3])
        if marker in _SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", bytes(data[pos + 5 : pos + 9]))
            return height, width
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def require_pixels(data: bytes | np.ndarray, path: Path) -> None:
    """A `DecodeError` if the header of ``data`` claims more than `MAX_PIXELS` pixels."""
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise DecodeError(
            f"{path}: header claims {size[0]}x{size[1]} pixels, more than the "
            f"{MAX_PIXELS} allowed (not decoded)"
        )


def _png_header(data: np.ndarray) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None if ``data`` is not a PNG."""
    if bytes(data[:8]).startswith(b"\x89PNG") and len(data) > 25 and bytes(data[12:16]) == b"IHDR":
        return int(data[24]), int(data[25])
    return None


#: libspng's output format for the PNGs it decodes here, by (bit depth, colour type): 8-bit
#: grey as is, 8-bit RGB and RGBA as RGB (alpha dropped, as OpenCV's colour modes drop it).
_SPNG_FORMATS = {(8, 0): "L", (8, 2): "RGB", (8, 6): "RGB"}


def _checked_bytes(path: Path, kind: str) -> np.ndarray:
    """The file's bytes once its header's pixel count and its end marker are checked."""
    data = _read_bytes(path)
    require_pixels(data, path)
    if (problem := truncation_problem(data)) is not None:
        raise DecodeError(f"cannot decode {kind}: {path} ({problem})")
    return data


def _spng_decode(path: Path, data: np.ndarray, kind: str, colour: bool) -> np.ndarray | None:
    """Checked ``data`` decoded by libspng (pyspng) if it is installed and the file is an 8-bit
    PNG of the wanted kind (``colour``: RGB(A), else grey); None otherwise. libspng decodes them
    about a third faster than OpenCV's libpng (``python -m bench.data``)."""
    header = _png_header(data)
    if _pyspng is None or header not in _SPNG_FORMATS or (header[1] != 0) != colour:
        return None
    try:
        return _pyspng.load(data.tobytes(), format=_SPNG_FORMATS[header])
    except RuntimeError as error:  # a damaged stream
        raise DecodeError(f"cannot decode {kind}: {path} ({error})") from None


def _decode(path: Path, data: np.ndarray, flags: int, kind: str) -> np.ndarray:
    """Checked ``data`` decoded with OpenCV; an undecodable file is a `DecodeError`."""
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DecodeError(f"cannot decode {kind}: {path}")
    return image


def read_rgb(path: Path) -> np.ndarray:
    """Colour image (.jpg/.png, grey or with alpha too) as uint8 HxWx3 RGB."""
    data = _checked_bytes(path, "image")
    if (image := _spng_decode(path, data, "image", colour=True)) is not None:
        return image
    image = _decode(path, data, cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB, "image")
    return image if _IMREAD_RGB is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_rgb_png(path: Path) -> np.ndarray:
    """An RGB-encoded map (e.g. normals) as uint8 HxWx3, without colour conversion quirks."""
    data = _checked_bytes(path, "PNG")
    if (image := _spng_decode(path, data, "PNG", colour=True)) is not None:
        return image
    if _IMREAD_RGB is not None and _png_header(data) in ((8, 2), (8, 6)):  # 8-bit RGB(A)
        return _decode(path, data, _IMREAD_RGB, "PNG")  # decoded straight to RGB, alpha dropped
    image = _decode(path, data, cv2.IMREAD_UNCHANGED, "PNG")
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise DecodeError(f"expected an 8-bit RGB PNG, got {image.dtype} {image.shape}: {path}")
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def _plain_grey_png(data: np.ndarray) -> bool:
    """A grey PNG of 8 or 16 bits, whose raw values OpenCV returns as Pillow does (1-bit PNGs
    decode to 0/255 there and to booleans in Pillow)."""
    return _png_header(data) in ((8, 0), (16, 0))


def read_label_png(path: Path) -> np.ndarray:
    """Single-channel PNG (grey or palette indices) as its raw HxW integer array."""
    data = _checked_bytes(path, "PNG")
    if (array := _spng_decode(path, data, "PNG", colour=False)) is not None:
        return array
    if _plain_grey_png(data):  # OpenCV: a few times faster than Pillow's path
        return _decode(path, data, cv2.IMREAD_UNCHANGED, "PNG")
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            array = np.array(image)  # a writable copy (np.asarray gives a read-only view)
    except Exception as error:  # Pillow raises several types for damaged files
        raise DecodeError(f"cannot decode PNG: {path} ({error})") from None
    if array.ndim == 3:  # an RGB(A) mask whose channels agree, e.g. 0/255 edge maps
        if not (array[..., :1] == array[..., : min(3, array.shape[2])]).all():
            raise DecodeError(f"expected a single-channel PNG, got {array.shape}: {path}")
        array = array[..., 0]
    return np.ascontiguousarray(array)


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # damaged headers raise several types (ValueError, EOFError, ..)
        raise DecodeError(f"cannot read .npy file: {path} ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise DecodeError(f"expected a numeric array in .npy file: {path}")
    return array


def read_mat(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """Variables of a MATLAB (v5) ``.mat`` file whose compressed variables inflate to at most
    ``max_bytes`` in all (None: `mtl.data.matcheck.MAX_INFLATED`)."""
    from mtl.data.matcheck import MAX_INFLATED, check_mat  # matcheck imports DecodeError from here

    data = _read_bytes(path).tobytes()
    # scipy's compiled reader can crash on a damaged struct, and inflates whatever it is given
    check_mat(path, data, MAX_INFLATED if max_bytes is None else max_bytes)
    try:
        return scipy.io.loadmat(io.BytesIO(data))
    except Exception as error:  # scipy raises many types for damaged files
        raise DecodeError(f"cannot read .mat file: {path} ({error})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width
