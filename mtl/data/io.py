"""File decoders shared by the dataset readers: images, PNG maps, ``.npy`` arrays, ``.mat`` files.

Images are decoded with OpenCV (libjpeg-turbo / libpng, no Python-level copies) and returned as
RGB uint8. Single-channel label PNGs go through Pillow, because OpenCV expands palette PNGs
(as used by PASCAL VOC label maps) to colours instead of returning the palette indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io
from PIL import Image


class DecodeError(ValueError):
    """A file exists but cannot be decoded as the expected kind of array."""


#: OpenCV >= 4.10 decodes straight to RGB; older versions decode BGR, converted after.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def read_rgb(path: Path) -> np.ndarray:
    """Colour image (.jpg/.png, grey or with alpha too) as uint8 HxWx3 RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB)
    if image is None:
        raise DecodeError(f"cannot decode image: {path}")
    return image if _IMREAD_RGB is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_rgb_png(path: Path) -> np.ndarray:
    """An RGB-encoded map (e.g. normals) as uint8 HxWx3, without colour conversion quirks."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DecodeError(f"cannot decode PNG: {path}")
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise DecodeError(f"expected an 8-bit RGB PNG, got {image.dtype} {image.shape}: {path}")
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def read_label_png(path: Path) -> np.ndarray:
    """Single-channel PNG (grey or palette indices) as its raw HxW integer array."""
    try:
        with Image.open(path) as image:
            array = np.array(image)  # a writable copy (np.asarray gives a read-only view)
    except OSError as error:
        raise DecodeError(f"cannot decode PNG: {path} ({error})") from None
    if array.ndim == 3:  # an RGB(A) mask whose channels agree, e.g. 0/255 edge maps
        if not (array[..., :1] == array[..., : min(3, array.shape[2])]).all():
            raise DecodeError(f"expected a single-channel PNG, got {array.shape}: {path}")
        array = array[..., 0]
    return np.ascontiguousarray(array)


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DecodeError(f"cannot read .npy file: {path} ({error})") from None


def read_mat(path: Path) -> dict[str, Any]:
    """Variables of a MATLAB (v5) ``.mat`` file."""
    try:
        return scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError) as error:
        raise DecodeError(f"cannot read .mat file: {path} ({error})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width
