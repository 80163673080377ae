"""Training augmentation on the device, on whole batches (``data.gpu_augment=true``).

The loader workers only decode, pad (or, with the resize protocol, resize) to a common size and
convert to tensors, keeping the image uint8 (``decode_transforms``). ``BatchAugment`` then does
what ``mtl.data.transforms.train_transforms`` does on the CPU, with the same label-aware rules:
random scale (image bilinear, every label map nearest with half-pixel centres, depth divided by
the scale), a random crop with the ``cat_max_ratio`` rule for semseg, padding with each task's
ignore value (image black), horizontal flip (the channel named by the task's
``flip_negates_channel`` negated), photometric distortion of the image only and normalisation.
Random decisions come from a CPU ``torch.Generator``, so a seed gives the same batch on any
device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    PadTo,
    Resize,
    Sample,
    _as_hw,
    _check_protocol,
    _hue_rotation_matrix,
    _luma_weights,
    _pads_per_sample,
    _scale_range,
    _target,
)
from mtl.tasks import get_task

Batch = dict[str, Any]


class ToTensorUint8:
    """Numpy sample -> tensors as ``ToTensorNormalize`` gives them, but the image stays uint8
    [3,H,W] (normalised on the device, a quarter of the bytes to transfer)."""

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key in sample:
            if key == "image":
                out[key] = torch.from_numpy(np.ascontiguousarray(sample[key].transpose(2, 0, 1)))
            elif key != "meta":
                out[key] = _target(key, sample[key])
        return out

    def __repr__(self) -> str:
        return "ToTensorUint8()"


def decode_transforms(size: int | Sequence[int], protocol: str = "pad") -> Compose:
    """Worker side of ``data.gpu_augment``: pad bottom/right to at least ``size`` with each
    task's ignore value (``pad``; larger samples must share one size to batch) or resize to it
    (``resize``), then tensors with a uint8 image."""
    _check_protocol(protocol)
    height, width = _as_hw(size)
    first = PadTo(height, width) if protocol == "pad" else Resize(height, width)
    return Compose([first, ToTensorUint8()])


def _pads(batch: Batch, size: int) -> list[tuple[int, int, int, int]]:
    """Per-sample (top, bottom, left, right) padding of the collated batch (zeros if unknown)."""
    meta = batch.get("meta")
    pad = meta.get("pad") if isinstance(meta, Mapping) else None
    if pad is None:
        return [(0, 0, 0, 0)] * size
    return _pads_per_sample(pad, size)


class BatchAugment:
    """Random scale + crop, flip and photometric distortion of a collated batch on its device.

    Args:
        crop_size: (H, W) of the output.
        scale_range: s ~ U[low, high] per sample; None: crop without rescaling.
        flip: mirror each sample with probability 0.5.
        photometric: mmseg's colour jitter (as ``PhotometricDistortion``), per sample.
        cat_max_ratio / max_tries: up to ``max_tries`` windows are drawn and the first in which
            no semseg class covers ``cat_max_ratio`` or more of the labelled pixels is kept
            (fewer than two classes does not pass); none passing: the last. >= 1 disables it.
        seed: seed of the generator; ``__call__(batch, seed=...)`` reseeds it per call.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        scale_range: Sequence[float] | None = (0.5, 2.0),
        flip: bool = True,
        photometric: bool = True,
        cat_max_ratio: float = 0.75,
        max_tries: int = 10,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18 / 180,
        seed: int = 0,
    ) -> None:
        self.height, self.width = _as_hw(crop_size)
        self.scale_range = _scale_range(scale_range)
        self.flip = flip
        self.photometric = photometric
        self.cat_max_ratio = cat_max_ratio
        self.max_tries = max(1, max_tries)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta
        self.generator = torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------- randomness
    def _uniform(self, low: float, high: float, n: int = 1) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator, dtype=torch.float64)

    def _randint(self, high: int, n: int) -> list[int]:
        return torch.randint(high, (n,), generator=self.generator).tolist()

    # ---------------------------------------------------------------- call
    def __call__(self, batch: Batch, seed: int | None = None) -> Batch:
        if seed is not None:
            self.generator.manual_seed(seed)
        keys = [k for k in batch if k != "meta" and isinstance(batch[k], Tensor)]
        size = batch["image"].shape[0]
        pads = _pads(batch, size)
        samples, new_pads = [], []
        for i in range(size):
            sample, pad = self._scale_crop({k: batch[k][i] for k in keys}, pads[i])
            samples.append(sample)
            new_pads.append(pad)
        out = dict(batch)
        for key in keys:
            out[key] = torch.stack([s[key] for s in samples])
        if self.flip:
            self._flip(out, keys, new_pads)
        image = out["image"].float()
        if self.photometric:
            image = self._photometric(image)
        mean = torch.tensor(self.mean, device=image.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=image.device).view(1, 3, 1, 1) * 255
        out["image"] = (image - mean) / std
        if isinstance(out.get("meta"), Mapping):
            columns = torch.tensor(new_pads, dtype=torch.int64).T
            out["meta"] = {**out["meta"], "pad": list(columns)}
        return out

    # ---------------------------------------------------------------- geometry
    def _scale_crop(
        self, sample: dict[str, Tensor], pad: tuple[int, int, int, int]
    ) -> tuple[dict[str, Tensor], tuple[int, int, int, int]]:
        """One sample [C,H,W] / [H,W]: valid region, rescaled, cropped, padded to the crop."""
        top_pad, bottom_pad, left_pad, right_pad = pad
        height = sample["image"].shape[-2] - top_pad - bottom_pad
        width = sample["image"].shape[-1] - left_pad - right_pad
        scale = 1.0 if self.scale_range is None else float(self._uniform(*self.scale_range))
        scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
        scaled = {}
        for key, value in sample.items():
            value = value[..., top_pad : top_pad + height, left_pad : left_pad + width]
            if (scaled_h, scaled_w) != (height, width):
                value = _resize(value, key, scaled_h, scaled_w)
            if key == "depth" and scale != 1.0:
                value = value / scale
            scaled[key] = value
        top, left = self._choose_window(scaled.get("semseg"), scaled_h, scaled_w)
        valid_h = max(0, min(self.height, scaled_h - top))
        valid_w = max(0, min(self.width, scaled_w - left))
        out = {}
        for key, value in scaled.items():
            window = value[..., top : top + valid_h, left : left + valid_w]
            fill = 0.0 if key == "image" else get_task(key).ignore_value
            out[key] = F.pad(
                window, (0, self.width - valid_w, 0, self.height - valid_h), value=fill
            )
        return out, (0, self.height - valid_h, 0, self.width - valid_w)

    def _choose_window(
        self, semseg: Tensor | None, scaled_h: int, scaled_w: int
    ) -> tuple[int, int]:
        tries = 1 if semseg is None or self.cat_max_ratio >= 1 else self.max_tries
        tops = self._randint(max(scaled_h, self.height) - self.height + 1, tries)
        lefts = self._randint(max(scaled_w, self.width) - self.width + 1, tries)
        if tries == 1:
            return tops[0], lefts[0]
        bins = IGNORE_INDEX + 1
        windows = torch.stack(
            [
                semseg[t : t + self.height, x : x + self.width]
                for t, x in zip(tops, lefts, strict=True)
            ]
        )  # every window has the same shape: the scaled size is fixed
        labels = windows.reshape(tries, -1).long().clamp(0, IGNORE_INDEX)
        labels = labels + bins * torch.arange(tries, device=labels.device)[:, None]
        counts = torch.bincount(labels.reshape(-1), minlength=tries * bins).view(tries, bins)
        counts[:, IGNORE_INDEX] = 0
        ratio = counts.max(dim=1).values / counts.sum(dim=1).clamp_min(1)
        passes = ((counts > 0).sum(dim=1) >= 2) & (ratio < self.cat_max_ratio)
        passing = passes.nonzero().flatten().tolist()  # one host sync per sample
        index = passing[0] if passing else tries - 1
        return tops[index], lefts[index]

    def _flip(self, out: Batch, keys: list[str], pads: list[tuple[int, int, int, int]]) -> None:
        size = out["image"].shape[0]
        coins = (torch.rand(size, generator=self.generator) < 0.5).tolist()
        if not any(coins):
            return
        index = torch.tensor([i for i, c in enumerate(coins) if c], device=out["image"].device)
        for key in keys:
            flipped = out[key][index].flip(-1)
            channel = None if key == "image" else get_task(key).flip_negates_channel
            if channel is not None:
                flipped[:, channel] = -flipped[:, channel]
            value = out[key].clone()
            value[index] = flipped
            out[key] = value
        for i, coin in enumerate(coins):
            if coin:
                top, bottom, left, right = pads[i]
                pads[i] = (top, bottom, right, left)

    # ---------------------------------------------------------------- colour
    def _photometric(self, image: Tensor) -> Tensor:
        """mmseg's four steps on a float [B,3,H,W] image in 0..255, each per sample with
        probability 0.5, rounded and saturated after each; contrast second or last."""
        size, device = image.shape[0], image.device
        coins = torch.rand(size, 5, generator=self.generator) < 0.5
        apply = {name: coins[:, i] for i, name in enumerate(("b", "c", "s", "h", "first"))}
        shift = self._uniform(-self.brightness_delta, self.brightness_delta, size)
        contrast = self._uniform(*self.contrast_range, size)
        saturation = self._uniform(*self.saturation_range, size)
        angles = 2 * math.pi * self._uniform(-self.hue_delta, self.hue_delta, size)
        luma = torch.tensor(_luma_weights(), dtype=torch.float32, device=device).view(1, 3, 1, 1)

        def per_sample(values: Tensor) -> Tensor:
            return values.to(device=device, dtype=torch.float32).view(-1, 1, 1, 1)

        def select(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
            return torch.where(mask.to(device).view(-1, 1, 1, 1), new.clamp(0, 255).round(), old)

        def contrast_step(img: Tensor, mask: Tensor) -> Tensor:
            mean = (img * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
            return select(mask, mean + per_sample(contrast) * (img - mean), img)

        image = select(apply["b"], image + per_sample(shift), image)
        image = contrast_step(image, apply["c"] & apply["first"])
        grey = (image * luma).sum(dim=1, keepdim=True)
        alpha = per_sample(saturation)
        image = select(apply["s"], alpha * image + (1 - alpha) * grey, image)
        matrices = torch.tensor(
            np.stack([_hue_rotation_matrix(float(a)) for a in angles]),
            dtype=torch.float32,
            device=device,
        )
        image = select(apply["h"], torch.einsum("bij,bjhw->bihw", matrices, image), image)
        return contrast_step(image, apply["c"] & ~apply["first"])

    def __repr__(self) -> str:
        return (
            f"BatchAugment(({self.height}, {self.width}), scale_range={self.scale_range}, "
            f"flip={self.flip}, photometric={self.photometric}, "
            f"cat_max_ratio={self.cat_max_ratio})"
        )


def _resize(value: Tensor, key: str, height: int, width: int) -> Tensor:
    """Image bilinear (half-pixel centres, no antialiasing), label maps nearest (half-pixel)."""
    batched = value[None] if value.ndim == 3 else value[None, None]
    if key == "image":
        out = F.interpolate(batched.float(), size=(height, width), mode="bilinear")
        if value.dtype == torch.uint8:
            out = out.round().clamp(0, 255).to(torch.uint8)
    elif batched.dtype.is_floating_point:
        out = F.interpolate(batched, size=(height, width), mode="nearest-exact")
    else:  # integer class maps: nearest needs floats on some devices; exact below 2**24
        out = F.interpolate(batched.float(), size=(height, width), mode="nearest-exact")
        out = out.to(value.dtype)
    return out[0] if value.ndim == 3 else out[0, 0]


def gpu_augment_pipeline(train_transform: Mapping[str, Any]) -> tuple[Compose, BatchAugment]:
    """The worker transform and the device augmentation equivalent to a ``train_transforms``
    config node (its ``crop_size``, ``scale_range``, ``flip``, ``photometric``,
    ``cat_max_ratio``, ``protocol``, ``mean`` and ``std``)."""
    options = {k: v for k, v in train_transform.items() if not k.startswith("_")}
    crop_size = options["crop_size"]
    decode = decode_transforms(crop_size, options.get("protocol", "pad"))
    augment = BatchAugment(
        crop_size,
        scale_range=options.get("scale_range", (0.5, 2.0)),
        flip=options.get("flip", True),
        photometric=options.get("photometric", True),
        cat_max_ratio=options.get("cat_max_ratio", 0.75),
        mean=options.get("mean", IMAGENET_MEAN),
        std=options.get("std", IMAGENET_STD),
    )
    return decode, augment
