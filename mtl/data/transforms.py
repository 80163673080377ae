"""Label-aware joint transforms for multi-task dense-prediction samples.

A sample is a dict of numpy arrays plus a ``"meta"`` dict. Everything stays in its compact
file dtype until the last step, ``ToTensorNormalize``:

- ``"image"``: uint8 HxWx3 RGB;
- ``"semseg"`` / ``"parts"``: uint8 HxW class indices (ignore 255);
- ``"depth"``: float32 HxW metres (invalid 0); ``"normals"``: float32 HxWx3 unit vectors
  (invalid zero vector), or uint8 HxWx3 as stored in PNGs (``2 * v / 255 - 1``; decoded,
  re-normalised and near-zero vectors made invalid at the last step); ``"edge"`` / ``"sal"``:
  uint8 HxW in {0, 1} (ignore 255);
- ``"meta"``: ``{"id": str, "orig_size": (H, W), "pad": (top, bottom, left, right)}``.

Geometric transforms resample the image bilinearly and every label map with nearest neighbour
(half-pixel centres), so label values never mix. Padding fills each task's invalid value from
the task registry and the image with black.
Random decisions come from torch's generator, so ``torch.manual_seed`` and DataLoader worker
seeding apply. OpenCV does the pixel work; set ``cv2.setNumThreads(1)`` in loader workers
(the datamodule does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from mtl.tasks import get_task

Sample = dict[str, Any]
Pad = tuple[int, int, int, int]  # top, bottom, left, right

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
#: Image padding: black.
IMAGE_PAD_VALUE = (0, 0, 0)
PROTOCOLS = ("pad", "resize")


# --------------------------------------------------------------------------- helpers


def _array_keys(sample: Sample) -> list[str]:
    """Keys of the sample holding spatial arrays (everything but ``meta``)."""
    return [key for key in sample if key != "meta"]


def _spatial_size(sample: Sample) -> tuple[int, int]:
    """(H, W) of the sample's image."""
    height, width = sample["image"].shape[:2]
    return int(height), int(width)


#: Fill value of uint8-encoded normals: decodes to (almost) zero length, i.e. invalid.
ENCODED_NORMAL_PAD_VALUE = 128
#: Length under which a decoded uint8 normal counts as "no normal" (127/128 decode to ~0).
ENCODED_NORMAL_MIN_NORM = 0.5


def _pad_value(key: str, dtype: np.dtype | None = None) -> float | tuple[int, ...]:
    """Fill value for padding ``key``: black for the image, the task's invalid value else."""
    if key == "image":
        return IMAGE_PAD_VALUE
    if key == "normals" and dtype == np.uint8:
        return ENCODED_NORMAL_PAD_VALUE
    return get_task(key).ignore_value


def _uniform(low: float, high: float) -> float:
    """A float drawn uniformly from [low, high] with torch's generator."""
    if low == high:
        return float(low)
    return low + (high - low) * float(torch.rand(()))


def _randint(high: int) -> int:
    """An int drawn uniformly from [0, high) with torch's generator."""
    return int(torch.randint(high, ()))


def _coin(p: float = 0.5) -> bool:
    """True with probability ``p``."""
    return float(torch.rand(())) < p


def _scale_range(scale_range: Sequence[float] | None) -> tuple[float, float] | None:
    """``(low, high)`` of a random-scale range as floats, checked 0 < low <= high; None: none."""
    if scale_range is None:
        return None
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"need 0 < min_scale <= max_scale, got {low}, {high}")
    return low, high


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or (H, W) pair to (H, W)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source indices for nearest resampling from ``n_in`` to ``n_out`` (half-pixel centres)."""
    idx = ((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def _take(array: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``array[rows][:, cols]``: whole-row copies first, then one gather along the columns."""
    return np.take(np.take(array, rows, axis=0), cols, axis=1)


#: dtypes OpenCV's geometric functions handle (with 1 or 3 channels); others go through NumPy.
_CV2_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _cv2_friendly(array: np.ndarray) -> bool:
    return array.dtype in _CV2_DTYPES and array.ndim in (2, 3) and array.shape[2:] in ((), (3,))


def _filled(shape: tuple[int, ...], dtype: np.dtype, value: float | tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=dtype)
    out[...] = np.asarray(value, dtype=dtype)  # an array broadcasts fast, a tuple does not
    return out


def _pad_array(array: np.ndarray, key: str, bottom: int, right: int) -> np.ndarray:
    """A contiguous copy of ``array`` padded at the bottom/right with the fill value of ``key``."""
    fill = _pad_value(key, array.dtype)
    if _cv2_friendly(array):  # OpenCV fills per-channel constants far faster than NumPy
        border = fill if isinstance(fill, tuple) else (fill,) * 4
        return cv2.copyMakeBorder(
            np.ascontiguousarray(array), 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=border
        )
    height, width = array.shape[:2]
    out = _filled((height + bottom, width + right, *array.shape[2:]), array.dtype, fill)
    out[:height, :width] = array
    return out


def _add_meta_pad(sample: Sample, pad: Pad) -> Sample:
    """Accumulate ``pad`` (top, bottom, left, right) into ``meta["pad"]`` if meta exists."""
    if "meta" not in sample:
        return sample
    meta = dict(sample["meta"])
    old = tuple(meta.get("pad", (0, 0, 0, 0)))
    meta["pad"] = tuple(int(a + b) for a, b in zip(old, pad, strict=True))
    return {**sample, "meta": meta}


def _pad_sample(sample: Sample, bottom: int, right: int) -> Sample:
    """Pad every array at the bottom/right with its key's fill value; record it in meta."""
    if bottom == 0 and right == 0:
        return sample
    out = dict(sample)
    for key in _array_keys(sample):
        out[key] = _pad_array(sample[key], key, bottom, right)
    return _add_meta_pad(out, (0, bottom, 0, right))


def _dominant_ratio(labels: np.ndarray, ignore_index: int) -> float | None:
    """Share of the most frequent class among labelled pixels; None if < 2 classes."""
    counts = np.bincount(labels.ravel(), minlength=ignore_index + 1)
    counts[ignore_index] = 0
    if np.count_nonzero(counts) < 2:
        return None
    return float(counts.max() / counts.sum())


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialiasing), any channel count."""
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an HxW or HxWxC array (half-pixel centres)."""
    return _take(array, nearest_index(height, array.shape[0]), nearest_index(width, array.shape[1]))


def _gather(
    array: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], fill: Any
) -> np.ndarray:
    """``array[rows][:, cols]`` placed top-left on a ``shape`` canvas filled with ``fill``.

    OpenCV's nearest remap does the gather and the fill in one pass (ten times faster than
    NumPy's fancy indexing on HxWx3 floats); indices outside the array read the fill value.
    """
    height, width = shape
    if _cv2_friendly(array):
        map_x = np.full(width, -1, dtype=np.float32)
        map_y = np.full(height, -1, dtype=np.float32)
        map_x[: len(cols)], map_y[: len(rows)] = cols, rows
        map_x = np.broadcast_to(map_x[None], shape).copy()
        map_y = np.broadcast_to(map_y[:, None], shape).copy()
        border = fill if isinstance(fill, tuple) else (fill,) * 4
        return cv2.remap(
            array, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
            borderValue=border,
        )  # fmt: skip
    canvas = _filled((height, width, *array.shape[2:]), array.dtype, fill)
    canvas[: len(rows), : len(cols)] = _take(array, rows, cols)
    return canvas


# --------------------------------------------------------------------------- transforms


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([{inner}])"


class RandomScaleCrop:
    """Random rescale by s ~ U[min_scale, max_scale], then a random fixed-size crop.

    The crop window is chosen in the coordinates of the rescaled (and, where it is smaller than
    the crop, bottom/right padded) sample. Label maps are never rescaled whole: their window is
    gathered from the nearest source pixels directly, padding included, so the cost is that of
    the crop. The image is rescaled bilinearly (OpenCV's resize, faster than resampling the
    window alone) and cropped. Depth values are divided by s (a scene enlarged s times looks
    s times closer).

    As in mmseg, up to ``max_tries`` windows are drawn and the first in which no semseg class
    covers ``cat_max_ratio`` or more of the labelled pixels is kept (a window with fewer than
    two labelled classes does not pass); if none passes, the last is used. ``cat_max_ratio >= 1``
    or a sample without semseg disables the check. ``scale_range=None`` crops without rescaling.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        scale_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ) -> None:
        self.height, self.width = _as_hw(crop_size)
        self.scale_range = _scale_range(scale_range)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max(1, max_tries)

    def __call__(self, sample: Sample) -> Sample:
        height, width = _spatial_size(sample)
        scale = 1.0 if self.scale_range is None else _uniform(*self.scale_range)
        scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
        rows_all = nearest_index(scaled_h, height)
        cols_all = nearest_index(scaled_w, width)
        top, left = self._choose_window(sample, rows_all, cols_all)
        valid_h = max(0, min(self.height, scaled_h - top))
        valid_w = max(0, min(self.width, scaled_w - left))
        rows = rows_all[top : top + valid_h]
        cols = cols_all[left : left + valid_w]

        out = dict(sample)
        crop = (self.height, self.width)
        for key in _array_keys(sample):
            array = sample[key]
            if key == "image":
                if (scaled_h, scaled_w) != (height, width):
                    array = _resize_image(array, scaled_h, scaled_w)
                window = array[top : top + valid_h, left : left + valid_w]
                out[key] = _pad_array(window, key, self.height - valid_h, self.width - valid_w)
            else:
                out[key] = _gather(array, rows, cols, crop, _pad_value(key, array.dtype))
                if key == "depth" and scale != 1.0:
                    out[key] /= np.float32(scale)
        return _add_meta_pad(out, (0, self.height - valid_h, 0, self.width - valid_w))

    def _random_window(self, scaled_h: int, scaled_w: int) -> tuple[int, int]:
        return (
            _randint(max(scaled_h, self.height) - self.height + 1),
            _randint(max(scaled_w, self.width) - self.width + 1),
        )

    def _choose_window(
        self, sample: Sample, rows_all: np.ndarray, cols_all: np.ndarray
    ) -> tuple[int, int]:
        scaled_h, scaled_w = len(rows_all), len(cols_all)
        top, left = self._random_window(scaled_h, scaled_w)
        if self.cat_max_ratio >= 1 or "semseg" not in sample:
            return top, left
        for _ in range(self.max_tries - 1):
            rows = rows_all[top : top + self.height]
            cols = cols_all[left : left + self.width]
            ratio = _dominant_ratio(_take(sample["semseg"], rows, cols), self.ignore_index)
            if ratio is not None and ratio < self.cat_max_ratio:
                break
            top, left = self._random_window(scaled_h, scaled_w)
        return top, left

    def __repr__(self) -> str:
        return (
            f"RandomScaleCrop(({self.height}, {self.width}), scale_range={self.scale_range}, "
            f"cat_max_ratio={self.cat_max_ratio})"
        )


def _flip(array: np.ndarray) -> np.ndarray:
    """A left-right mirrored copy (OpenCV's flip, much faster than a negative-stride copy)."""
    if _cv2_friendly(array):
        return cv2.flip(np.ascontiguousarray(array), 1)
    return np.ascontiguousarray(array[:, ::-1])


class RandomHorizontalFlip:
    """Mirror every array left-right with probability ``p``; negate the normals' x component.

    Left/right padding recorded in ``meta["pad"]`` is swapped accordingly.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if not _coin(self.p):
            return sample
        out = dict(sample)
        for key in _array_keys(sample):
            flipped = _flip(sample[key])
            channel = None if key == "image" else get_task(key).flip_negates_channel
            if channel is not None:
                if flipped.dtype == np.uint8:  # encoded 2v/255-1: -x is 255 - v, exactly
                    np.subtract(255, flipped[..., channel], out=flipped[..., channel])
                else:
                    flipped[..., channel] *= -1
            out[key] = flipped
        if "meta" in out and "pad" in out["meta"]:
            top, bottom, left, right = out["meta"]["pad"]
            out["meta"] = {**out["meta"], "pad": (top, bottom, right, left)}
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _luma_weights() -> np.ndarray:
    """ITU-R 601 luma weights of R, G, B."""
    return np.array([0.299, 0.587, 0.114])


def _hue_rotation_matrix(angle: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``angle`` radians around the grey axis (YIQ space)."""
    rgb_to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return np.linalg.inv(rgb_to_yiq) @ rotation @ rgb_to_yiq


class PhotometricDistortion:
    """Colour jitter of the uint8 RGB image only (mmseg's four steps, blend formulation).

    Brightness shift (+U[-delta, delta] levels), contrast (blend with the mean grey level by
    U[contrast_range]), saturation (blend with the pixel's grey by U[saturation_range]) and a
    hue rotation about the grey axis (U[-hue_delta, hue_delta] of the full circle), each with
    probability 0.5, every step saturating to 0..255; contrast goes either right after the
    brightness or last, at random. Value maps are 256-entry lookup tables and colour mixes one
    3x3 ``cv2.transform``, so the image stays uint8.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18 / 180,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _apply_lut(image: np.ndarray, values: np.ndarray) -> np.ndarray:
        return cv2.LUT(image, np.clip(np.rint(values), 0, 255).astype(np.uint8))

    def _brightness(self, image: np.ndarray) -> np.ndarray:
        shift = _uniform(-self.brightness_delta, self.brightness_delta)
        return self._apply_lut(image, np.arange(256) + shift)

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        mean = float(np.dot(_luma_weights(), cv2.mean(image)[:3]))  # mean of the grey image
        alpha = _uniform(*self.contrast_range)
        return self._apply_lut(image, mean + alpha * (np.arange(256) - mean))

    def _saturation(self, image: np.ndarray) -> np.ndarray:
        alpha = _uniform(*self.saturation_range)
        mix = alpha * np.eye(3) + (1 - alpha) * np.outer(np.ones(3), _luma_weights())
        return cv2.transform(image, mix)

    def _hue(self, image: np.ndarray) -> np.ndarray:
        angle = 2 * np.pi * _uniform(-self.hue_delta, self.hue_delta)
        return cv2.transform(image, _hue_rotation_matrix(angle))

    def __call__(self, sample: Sample) -> Sample:
        contrast_first = _coin()
        steps = [self._brightness, self._saturation, self._hue]
        steps.insert(1 if contrast_first else 3, self._contrast)
        image = np.ascontiguousarray(sample["image"])
        for step in steps:
            if _coin():
                image = step(image)
        return {**sample, "image": image}

    def __repr__(self) -> str:
        return "PhotometricDistortion()"


class PadTo:
    """Pad bottom/right to at least (height, width) with each key's fill value.

    A side already at least that long is left as it is (NYUD_MT's 480x640 images need no
    padding to 448x576). The padding is recorded in ``meta["pad"]`` as (top, bottom, left,
    right) so that predictions can be cropped back with ``crop_to_original``.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width

    def __call__(self, sample: Sample) -> Sample:
        height, width = _spatial_size(sample)
        return _pad_sample(sample, max(0, self.height - height), max(0, self.width - width))

    def __repr__(self) -> str:
        return f"PadTo({self.height}, {self.width})"


class Resize:
    """Resize to a fixed (height, width): image bilinear, label maps nearest.

    Depth values are kept unchanged: resizing changes the sampling grid, it does not move the
    camera (the resize protocol of MTI-Net and M3ViT). ``meta["orig_size"]`` keeps the size on
    disk.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width

    def __call__(self, sample: Sample) -> Sample:
        if _spatial_size(sample) == (self.height, self.width):
            return sample
        out = dict(sample)
        for key in _array_keys(sample):
            resize = _resize_image if key == "image" else _resize_nearest
            out[key] = resize(sample[key], self.height, self.width)
        return out

    def __repr__(self) -> str:
        return f"Resize({self.height}, {self.width})"


class ToTensorNormalize:
    """The last step: numpy sample -> the framework's tensors, image normalised.

    image uint8 HxWx3 -> float32 [3,H,W], ``(x / 255 - mean) / std``; classification targets
    -> int64 [H,W]; normals -> float32 [3,H,W]; depth/edge/sal -> float32 [1,H,W]. ``meta``
    is passed through.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key in _array_keys(sample):
            out[key] = self._image(sample[key]) if key == "image" else _target(key, sample[key])
        return out

    def _image(self, image: np.ndarray) -> Tensor:
        """(x / 255 - mean) / std per channel, written straight into a CHW float32 array."""
        scale = 255.0 if image.dtype == np.uint8 else 1.0  # float images in [0, 1] work too
        out = np.empty((image.shape[2], *image.shape[:2]), dtype=np.float32)
        for c, channel in enumerate(cv2.split(np.ascontiguousarray(image))):
            np.subtract(channel, np.float32(scale * self.mean[c]), out=out[c], dtype=np.float32)
            out[c] *= np.float32(1.0 / (scale * self.std[c]))
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean}, std={self.std})"


#: uint8 code -> normal component ``2 * v / 255 - 1``.
_NORMAL_CODES = (np.arange(256, dtype=np.float32) * np.float32(2 / 255) - np.float32(1)).astype(
    np.float32
)


def lookup(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``table[codes]`` for a 256-entry table and a uint8 image (HxW or HxWxC, C <= 4), by
    OpenCV's ``LUT``: 3-4x faster than NumPy's indexing on a decoded image."""
    if codes.dtype != np.uint8 or table.shape != (256,) or codes.ndim not in (2, 3):
        return table[codes]
    if codes.ndim == 3 and codes.shape[2] > 4:
        return table[codes]
    return cv2.LUT(np.ascontiguousarray(codes), table).reshape(codes.shape)


def decode_normals(encoded: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 normals ``2 * v / 255 - 1`` -> float32 3xHxW unit vectors, near-zero -> 0."""
    chw = np.ascontiguousarray(lookup(_NORMAL_CODES, encoded).transpose(2, 0, 1))
    x, y, z = chw
    norm = np.sqrt(x * x + y * y + z * z)
    valid = norm >= ENCODED_NORMAL_MIN_NORM
    chw *= np.divide(1.0, norm, out=np.zeros_like(norm), where=valid)
    return chw


def _target(key: str, array: np.ndarray) -> Tensor:
    """One target map as its contract tensor."""
    if key == "normals" and array.dtype == np.uint8:
        return torch.from_numpy(decode_normals(array))
    if not array.flags.writeable:  # torch.from_numpy wants memory it may write
        array = array.copy()
    if array.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
    if get_task(key).classification:
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.int64)
    return torch.from_numpy(np.ascontiguousarray(array[None], dtype=np.float32))


# --------------------------------------------------------------------------- undoing padding


def _pads_per_sample(pad: Any, batch_size: int) -> list[Pad]:
    """Per-sample (top, bottom, left, right) from a collated or plain ``meta["pad"]``."""
    if isinstance(pad, Tensor) and pad.ndim == 2:  # [B, 4]
        return [tuple(int(v) for v in row) for row in pad.tolist()]
    values = list(pad)
    if len(values) == 4 and all(isinstance(v, Tensor) and v.ndim == 1 for v in values):
        columns = [v.tolist() for v in values]  # default_collate: four [B] tensors
        return [tuple(int(c[i]) for c in columns) for i in range(batch_size)]
    if len(values) == 4 and all(isinstance(v, int | np.integer) for v in values):
        return [tuple(int(v) for v in values)] * batch_size
    return [tuple(int(v) for v in p) for p in values]


def crop_to_original(batch: Tensor, pad: Any) -> list[Tensor]:
    """Undo ``PadTo`` on a batched prediction: one tensor per sample at its original size.

    ``batch`` is [B, ...,H, W]; ``pad`` is the batch's ``meta["pad"]`` as the default collate
    function returns it (four [B] tensors), a [B, 4] tensor, a list of per-sample tuples, or
    one tuple for every sample. Samples may have different sizes, hence a list.
    """
    pads = _pads_per_sample(pad, batch.shape[0])
    if len(pads) != batch.shape[0]:
        raise ValueError(f"{len(pads)} pads for a batch of {batch.shape[0]}")
    height, width = batch.shape[-2:]
    return [
        batch[i, ..., top : height - bottom, left : width - right]
        for i, (top, bottom, left, right) in enumerate(pads)
    ]


# --------------------------------------------------------------------------- builders


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def train_transforms(
    crop_size: int | Sequence[int],
    scale_range: Sequence[float] | None = (0.5, 2.0),
    flip: bool = True,
    photometric: bool = True,
    cat_max_ratio: float = 0.75,
    protocol: str = "pad",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Training pipeline, ending with tensors + normalisation by `mean` and `std` (the data
    configs pass the backbone weights' own, ``data.mean``/``data.std``).

    ``pad`` (ATRC / InvPT): random scale, ``crop_size`` crop (padding smaller samples), flip,
    colour jitter. ``resize`` (MTI-Net / M3ViT): resize to ``crop_size`` first, then the same
    steps (a ``scale_range`` of e.g. [1.0, 1.5] zooms in).
    """
    _check_protocol(protocol)
    height, width = _as_hw(crop_size)
    steps: list[Callable[[Sample], Sample]] = []
    if protocol == "resize":
        steps.append(Resize(height, width))
    steps.append(RandomScaleCrop((height, width), scale_range, cat_max_ratio=cat_max_ratio))
    if flip:
        steps.append(RandomHorizontalFlip())
    if photometric:
        steps.append(PhotometricDistortion())
    steps.append(ToTensorNormalize(mean, std))
    return Compose(steps)


def eval_transforms(
    size: int | Sequence[int] | None = None,
    protocol: str = "pad",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Evaluation pipeline: pad bottom/right to ``size`` (``pad``) or resize to it (``resize``),
    then tensors + normalisation by `mean` and `std`. ``size=None`` keeps samples as they are."""
    _check_protocol(protocol)
    steps: list[Callable[[Sample], Sample]] = []
    if size is not None:
        height, width = _as_hw(size)
        steps.append(PadTo(height, width) if protocol == "pad" else Resize(height, width))
    steps.append(ToTensorNormalize(mean, std))
    return Compose(steps)
