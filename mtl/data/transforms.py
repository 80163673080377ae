"""Label-aware joint transforms for multi-task dense-prediction samples.

A sample is a dict of numpy arrays plus a ``"meta"`` dict:

- ``"image"``: float32 HxWx3, RGB in [0, 1];
- ``"semseg"``: int64 HxW (ignore 255); ``"depth"``: float32 HxW (invalid 0);
  ``"normals"``: float32 HxWx3 (invalid zero vector); ``"edge"`` / ``"sal"``: float32 HxW
  (ignore 255);
- ``"meta"``: ``{"id": str, "orig_size": (H, W), "pad": (top, bottom, left, right)}``.

Geometric transforms resample the image bilinearly and every label map with nearest
neighbour, so label values never mix. ``ToTensor`` followed by ``Normalize`` produces the
framework's tensor contract. Random decisions are drawn from torch's generator so that
``torch.manual_seed`` and DataLoader worker seeding apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mtl.tasks import get_task

Sample = dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255



# --------------------------------------------------------------------------- helpers


def _array_keys(sample: Sample) -> list[str]:
    """Keys of the sample holding spatial arrays (everything but ``meta``)."""
    return [key for key in sample if key != "meta"]


def _spatial_size(sample: Sample) -> tuple[int, int]:
    """(H, W) of the sample's image."""
    height, width = sample["image"].shape[:2]
    return int(height), int(width)


def _pad_value(key: str) -> float:
    """Fill value for padding ``key``: black for the image, the task's invalid value otherwise."""
    return 0.0 if key == "image" else get_task(key).ignore_value


def _uniform(low: float, high: float) -> float:
    """A float drawn uniformly from [low, high] with torch's generator."""
    if low == high:
        return float(low)
    return low + (high - low) * float(torch.rand(()))


def _randint(high: int) -> int:
    """An int drawn uniformly from [0, high) with torch's generator."""
    return int(torch.randint(high, ()))


def _coin(p: float) -> bool:
    """True with probability ``p``."""
    return float(torch.rand(())) < p


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source indices for nearest resampling with half-pixel centres."""
    idx = ((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def _linear_index(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper source indices and weights for linear resampling (half-pixel centres)."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lower = np.floor(pos).astype(np.intp)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (pos - lower).astype(np.float32)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an HxW or HxWxC array."""
    rows = _nearest_index(height, array.shape[0])
    cols = _nearest_index(width, array.shape[1])
    return array[rows[:, None], cols[None, :]]


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (no antialiasing, like OpenCV/torch) of an HxW or HxWxC float array."""
    y0, y1, wy = _linear_index(height, array.shape[0])
    x0, x1, wx = _linear_index(width, array.shape[1])
    extra = (1,) * (array.ndim - 2)
    wy = wy.reshape((height, 1) + extra)
    wx = wx.reshape((1, width) + extra)
    top, bottom = array[y0], array[y1]
    top = top[:, x0] * (1 - wx) + top[:, x1] * wx
    bottom = bottom[:, x0] * (1 - wx) + bottom[:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(array.dtype, copy=False)


def _resize_sample(sample: Sample, height: int, width: int) -> Sample:
    """Resize the image bilinearly and all label maps with nearest neighbour."""
    out = dict(sample)
    for key in _array_keys(sample):
        resize = resize_bilinear if key == "image" else resize_nearest
        out[key] = resize(sample[key], height, width)
    return out


def _add_meta_pad(sample: Sample, pad: tuple[int, int, int, int]) -> Sample:
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
        array = sample[key]
        widths = [(0, bottom), (0, right)] + [(0, 0)] * (array.ndim - 2)
        out[key] = np.pad(array, widths, mode="constant", constant_values=_pad_value(key))
    return _add_meta_pad(out, (0, bottom, 0, right))


def _crop_sample(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop every array to the window starting at (top, left)."""
    out = dict(sample)
    for key in _array_keys(sample):
        out[key] = sample[key][top : top + height, left : left + width]
    return out


def _dominant_ratio(semseg: np.ndarray, ignore_index: int) -> float | None:
    """Share of the most frequent class among labelled pixels; None if < 2 classes."""
    labels, counts = np.unique(semseg, return_counts=True)
    counts = counts[labels != ignore_index]
    if len(counts) < 2:
        return None
    return float(counts.max() / counts.sum())


def _rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601) of an HxWx3 RGB image, shape HxWx1."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (image @ weights)[..., None]


def _hue_rotation_matrix(angle: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``angle`` radians around the grey axis (YIQ space)."""
    rgb_to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return (np.linalg.inv(rgb_to_yiq) @ rotation @ rgb_to_yiq).astype(np.float32)


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or (H, W) pair to (H, W)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


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


class RandomScale:
    """Rescale by a factor drawn uniformly from [min_scale, max_scale].

    The image is resampled bilinearly, every label map with nearest neighbour (normals stay
    unit vectors, classes stay classes). Depth values are divided by the factor: a scene
    enlarged s times looks s times closer.
    """

    def __init__(self, min_scale: float, max_scale: float) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale = min_scale
        self.max_scale = max_scale

    def __call__(self, sample: Sample) -> Sample:
        scale = _uniform(self.min_scale, self.max_scale)
        height, width = _spatial_size(sample)
        new_h = max(1, round(height * scale))
        new_w = max(1, round(width * scale))
        out = _resize_sample(sample, new_h, new_w)
        if "depth" in out:
            out["depth"] = (out["depth"] / scale).astype(np.float32)
        return out

    def __repr__(self) -> str:
        return f"RandomScale({self.min_scale}, {self.max_scale})"


class RandomCrop:
    """Random crop of a fixed size, padding first (bottom/right) when the sample is smaller.

    As in mmseg, up to ``max_tries`` windows are drawn and the first one in which no single
    semseg class covers ``cat_max_ratio`` or more of the labelled (non-ignore) pixels is
    kept; a window with fewer than two labelled classes does not pass. If none passes, the
    last window is used. ``cat_max_ratio >= 1`` or a sample without semseg disables the check.
    """

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ) -> None:
        self.height = height
        self.width = width
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max(1, max_tries)

    def _random_window(self, height: int, width: int) -> tuple[int, int]:
        return _randint(height - self.height + 1), _randint(width - self.width + 1)

    def _accepts(self, semseg: np.ndarray, top: int, left: int) -> bool:
        window = semseg[top : top + self.height, left : left + self.width]
        ratio = _dominant_ratio(window, self.ignore_index)
        return ratio is not None and ratio < self.cat_max_ratio

    def _choose_window(self, sample: Sample) -> tuple[int, int]:
        height, width = _spatial_size(sample)
        top, left = self._random_window(height, width)
        if self.cat_max_ratio >= 1 or "semseg" not in sample:
            return top, left
        for _ in range(self.max_tries - 1):
            if self._accepts(sample["semseg"], top, left):
                break
            top, left = self._random_window(height, width)
        return top, left

    def __call__(self, sample: Sample) -> Sample:
        height, width = _spatial_size(sample)
        sample = _pad_sample(sample, max(0, self.height - height), max(0, self.width - width))
        top, left = self._choose_window(sample)
        return _crop_sample(sample, top, left, self.height, self.width)

    def __repr__(self) -> str:
        return f"RandomCrop({self.height}, {self.width}, cat_max_ratio={self.cat_max_ratio})"


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
            out[key] = np.ascontiguousarray(sample[key][:, ::-1])
        for key in _array_keys(out):
            channel = None if key == "image" else get_task(key).flip_negates_channel
            if channel is not None:
                out[key] = out[key].copy()
                out[key][..., channel] *= -1
        if "meta" in out and "pad" in out["meta"]:
            top, bottom, left, right = out["meta"]["pad"]
            out["meta"] = {**out["meta"], "pad": (top, bottom, right, left)}
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class PhotometricDistortion:
    """mmseg-style colour jitter on the image only (RGB in [0, 1]).

    Brightness shift, contrast and saturation blends with the greyscale image, and a hue
    rotation about the grey axis, each applied with probability 0.5; contrast goes either
    first or last at random. ``hue_delta`` is a fraction of the full hue circle.
    """

    def __init__(
        self,
        brightness_delta: float = 32 / 255,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18 / 180,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def _brightness(self, image: np.ndarray) -> np.ndarray:
        return image + _uniform(-self.brightness_delta, self.brightness_delta)

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        mean = _rgb_to_gray(image).mean()
        return mean + _uniform(*self.contrast_range) * (image - mean)

    def _saturation(self, image: np.ndarray) -> np.ndarray:
        gray = _rgb_to_gray(image)
        return gray + _uniform(*self.saturation_range) * (image - gray)

    def _hue(self, image: np.ndarray) -> np.ndarray:
        angle = 2 * np.pi * _uniform(-self.hue_delta, self.hue_delta)
        return image @ _hue_rotation_matrix(angle).T

    def __call__(self, sample: Sample) -> Sample:
        contrast_first = _coin(0.5)
        steps = [self._brightness, self._saturation, self._hue]
        steps.insert(1 if contrast_first else 3, self._contrast)
        image = sample["image"]
        for step in steps:
            if _coin(0.5):
                image = np.clip(step(image), 0.0, 1.0)
        return {**sample, "image": image.astype(np.float32, copy=False)}

    def __repr__(self) -> str:
        return "PhotometricDistortion()"


class PadTo:
    """Pad bottom/right to a fixed (height, width) with each key's ignore value.

    The padding is recorded in ``meta["pad"]`` as (top, bottom, left, right) so that
    predictions can be cropped back to the original extent.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width

    def __call__(self, sample: Sample) -> Sample:
        height, width = _spatial_size(sample)
        if height > self.height or width > self.width:
            raise ValueError(
                f"cannot pad a {height}x{width} sample to smaller size {self.height}x{self.width}"
            )
        return _pad_sample(sample, self.height - height, self.width - width)

    def __repr__(self) -> str:
        return f"PadTo({self.height}, {self.width})"


class Resize:
    """Resize to a fixed (height, width): image bilinear, label maps nearest.

    Depth values are kept unchanged: resizing changes the sampling grid, it does not move
    the camera (this matches the resize evaluation protocol of the benchmark codes).
    """

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width

    def __call__(self, sample: Sample) -> Sample:
        return _resize_sample(sample, self.height, self.width)

    def __repr__(self) -> str:
        return f"Resize({self.height}, {self.width})"


class ToTensor:
    """Convert numpy arrays to contract tensors.

    image -> float32 [3,H,W]; semseg -> int64 [H,W]; depth/edge/sal -> float32 [1,H,W];
    normals -> float32 [3,H,W]. ``meta`` is passed through.
    """

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key in _array_keys(sample):
            out[key] = self._convert(key, np.asarray(sample[key]))
        return out

    @staticmethod
    def _convert(key: str, array: np.ndarray) -> torch.Tensor:
        if array.ndim == 3:
            chw = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
            return torch.from_numpy(chw)
        if get_task(key).classification:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        return torch.from_numpy(np.ascontiguousarray(array[None], dtype=np.float32))

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Normalise the (tensor) image channel-wise: ``(image - mean) / std``."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return {**sample, "image": (image - mean) / std}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class ToTensorNormalize(Compose):
    """``ToTensor`` followed by ``Normalize`` (ImageNet statistics by default)."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__([ToTensor(), Normalize(mean, std)])


# --------------------------------------------------------------------------- builders


def train_transforms(
    crop_size: int | Sequence[int],
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    flip: bool = True,
    photometric: bool = True,
    cat_max_ratio: float = 0.75,
) -> Compose:
    """Training pipeline: scale, crop, flip, colour jitter, then tensors + normalisation."""
    height, width = _as_hw(crop_size)
    steps: list[Callable[[Sample], Sample]] = []
    if scale_range is not None:
        steps.append(RandomScale(*scale_range))
    steps.append(RandomCrop(height, width, cat_max_ratio=cat_max_ratio))
    if flip:
        steps.append(RandomHorizontalFlip())
    if photometric:
        steps.append(PhotometricDistortion())
    steps.append(ToTensorNormalize())
    return Compose(steps)


def eval_transforms(pad_size: int | Sequence[int] | None = None) -> Compose:
    """Evaluation pipeline: optional bottom/right padding, then tensors + normalisation."""
    steps: list[Callable[[Sample], Sample]] = []
    if pad_size is not None:
        steps.append(PadTo(*_as_hw(pad_size)))
    steps.append(ToTensorNormalize())
    return Compose(steps)
