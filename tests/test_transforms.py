"""Tests for the label-aware joint transforms on hand-made arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mtl.data.transforms import (
    IMAGE_PAD_VALUE,
    Compose,
    PadTo,
    PhotometricDistortion,
    RandomHorizontalFlip,
    RandomScaleCrop,
    Resize,
    ToTensorNormalize,
    crop_to_original,
    eval_transforms,
    nearest_index,
    train_transforms,
)

TARGETS = ("semseg", "parts", "depth", "normals", "edge", "sal")


def _sample(h: int = 6, w: int = 8, encoded_normals: bool = False) -> dict:
    """A sample of every target whose maps encode the pixel position, so moves are traceable."""
    yy, xx = np.mgrid[0:h, 0:w]
    normals = np.zeros((h, w, 3), dtype=np.float32)
    normals[..., 0], normals[..., 2] = 0.6, 0.8
    normals[0, 0] = 0.0
    if encoded_normals:
        normals = np.rint((normals + 1) * 127.5).astype(np.uint8)
        normals[0, 0] = 128
    image = np.stack([yy * 20, xx * 20, np.full((h, w), 128)], -1).astype(np.uint8)
    return {
        "image": image,
        "semseg": (xx % 3).astype(np.uint8),
        "parts": (yy % 7).astype(np.uint8),
        "depth": (1.0 + xx + 10 * yy).astype(np.float32),
        "normals": normals,
        "edge": (yy == 2).astype(np.uint8),
        "sal": (xx < 2).astype(np.uint8),
        "meta": {"id": "x", "orig_size": (h, w), "pad": (0, 0, 0, 0)},
    }


@pytest.mark.parametrize("encoded", [False, True])
def test_flip_mirrors_every_target_and_negates_normals_x(encoded: bool) -> None:
    sample = _sample(encoded_normals=encoded)
    out = RandomHorizontalFlip(p=1.0)(sample)
    for key in ("image", "semseg", "parts", "depth", "edge", "sal"):
        np.testing.assert_array_equal(out[key], sample[key][:, ::-1], err_msg=key)
    flipped = ToTensorNormalize()(out)["normals"]
    original = ToTensorNormalize()(sample)["normals"].flip(-1)
    torch.testing.assert_close(flipped[0], -original[0])
    torch.testing.assert_close(flipped[1:], original[1:])
    assert (flipped[:, 0, -1] == 0).all()  # the invalid pixel stays invalid
    assert RandomHorizontalFlip(p=0.0)(sample) is sample


def test_flip_swaps_recorded_left_right_padding() -> None:
    sample = PadTo(6, 10)(_sample())
    assert RandomHorizontalFlip(p=1.0)(sample)["meta"]["pad"] == (0, 0, 2, 0)


def _reference_scale_crop(sample: dict, scale: float, top: int, left: int, size: tuple) -> dict:
    """Rescale everything whole (image bilinear, labels nearest), then crop: the definition."""
    h, w = sample["image"].shape[:2]
    sh, sw = round(h * scale), round(w * scale)
    rows, cols = nearest_index(sh, h), nearest_index(sw, w)
    out = {"image": cv2.resize(sample["image"], (sw, sh), interpolation=cv2.INTER_LINEAR)}
    for key in TARGETS:
        out[key] = sample[key][rows[:, None], cols[None, :]]
    out["depth"] = out["depth"] / np.float32(scale)
    return {k: v[top : top + size[0], left : left + size[1]] for k, v in out.items()}


@pytest.mark.parametrize("scale", [2.0, 1.5, 1.0])
def test_scale_crop_equals_rescale_then_crop(scale: float) -> None:
    sample = _sample(12, 16)
    torch.manual_seed(3)
    out = RandomScaleCrop((8, 10), (scale, scale), cat_max_ratio=1.0)(sample)
    # recover the window from the traceable depth of the top-left pixel
    sh, sw = round(12 * scale), round(16 * scale)
    found = None
    for top in range(sh - 8 + 1):
        for left in range(sw - 10 + 1):
            ref = _reference_scale_crop(sample, scale, top, left, (8, 10))
            if all(np.array_equal(out[k], ref[k]) for k in TARGETS):
                found = ref
    assert found is not None, "no window of the rescaled sample matches"
    np.testing.assert_array_equal(out["image"], found["image"])
    assert out["semseg"].dtype == np.uint8 and out["depth"].dtype == np.float32
    assert out["meta"]["pad"] == (0, 0, 0, 0)


def test_scale_divides_depth_and_keeps_label_sets() -> None:
    sample = _sample()
    out = RandomScaleCrop((12, 16), (2.0, 2.0))(sample)
    np.testing.assert_array_equal(out["depth"][::2, ::2], sample["depth"] / 2)
    np.testing.assert_array_equal(out["semseg"][1::2, 1::2], sample["semseg"])
    for key in ("semseg", "parts", "edge", "sal"):
        assert set(np.unique(out[key])) == set(np.unique(sample[key])), key
    norms = np.linalg.norm(out["normals"], axis=-1)
    assert set(np.round(np.unique(norms), 6)) == {0.0, 1.0}


@pytest.mark.parametrize("encoded", [False, True])
def test_crop_pads_small_samples_with_each_targets_invalid_value(encoded: bool) -> None:
    out = RandomScaleCrop((8, 10), None)(_sample(encoded_normals=encoded))
    assert out["meta"]["pad"] == (0, 2, 0, 2)
    for key, value in (("semseg", 255), ("parts", 255), ("edge", 255), ("sal", 255), ("depth", 0)):
        assert out[key].shape == (8, 10), key
        assert (out[key][6:] == value).all() and (out[key][:, 8:] == value).all(), key
    assert (out["image"][6:] == IMAGE_PAD_VALUE).all()
    normals = ToTensorNormalize()(out)["normals"]
    assert (normals[:, 6:] == 0).all() and (normals[:, :, 8:] == 0).all()
    assert (normals[:, 1:6, 1:8].norm(dim=0) - 1).abs().max() < 1e-2


def test_crop_respects_cat_max_ratio() -> None:
    semseg = np.zeros((20, 20), dtype=np.uint8)
    semseg[:10, :10] = 1  # class 0 dominates 3/4 of the image
    semseg[15:, 15:] = 255
    sample = {"image": np.zeros((20, 20, 3), np.uint8), "semseg": semseg}
    crop = RandomScaleCrop((10, 10), None, cat_max_ratio=0.75, max_tries=50)
    torch.manual_seed(0)
    for _ in range(20):
        window = crop(sample)["semseg"]
        labels, counts = np.unique(window[window != 255], return_counts=True)
        assert len(labels) == 2 and counts.max() / counts.sum() < 0.75


def test_pad_to_uses_invalid_values_records_meta_and_keeps_larger_sides() -> None:
    sample = _sample()
    out = PadTo(8, 11)(sample)
    assert out["meta"]["pad"] == (0, 2, 0, 3)
    for key, value in (("semseg", 255), ("edge", 255), ("sal", 255), ("depth", 0)):
        assert (out[key][6:] == value).all() and (out[key][:, 8:] == value).all(), key
    assert (out["normals"][6:] == 0).all()
    np.testing.assert_array_equal(out["depth"][:6, :8], sample["depth"])
    wide = PadTo(8, 4)(sample)  # width already larger: kept, only the height is padded
    assert wide["image"].shape == (8, 8, 3) and wide["meta"]["pad"] == (0, 2, 0, 0)


def test_pad_then_crop_back_gives_exactly_the_original() -> None:
    """Two samples of different sizes padded to one batch; predictions cropped back."""
    pad = eval_transforms((10, 12))
    samples = [_sample(6, 8), _sample(9, 12)]
    batch = default_collate([pad(s) for s in samples])
    originals = [ToTensorNormalize()(s) for s in samples]
    for key in ("image", "semseg", "depth", "normals"):
        restored = crop_to_original(batch[key], batch["meta"]["pad"])
        for got, want in zip(restored, originals, strict=True):
            torch.testing.assert_close(got, want[key], rtol=0, atol=0)
    # one sample, its own pad tuple; a [B, 4] tensor of pads
    single = pad(samples[0])
    (back,) = crop_to_original(single["depth"][None], single["meta"]["pad"])
    torch.testing.assert_close(back, originals[0]["depth"])
    pads = torch.tensor([list(p) for p in zip(*batch["meta"]["pad"], strict=True)])
    assert [t.shape for t in crop_to_original(batch["semseg"], pads)] == [(6, 8), (9, 12)]


def test_photometric_changes_the_uint8_image_only() -> None:
    sample = _sample(16, 16)
    sample["image"] = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    torch.manual_seed(1)
    out = Compose([PhotometricDistortion()] * 4)(sample)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (16, 16, 3)
    assert not np.array_equal(out["image"], sample["image"])
    for key in TARGETS:
        assert out[key] is sample[key]


def test_to_tensor_normalize_contract() -> None:
    sample = _sample()
    out = ToTensorNormalize()(sample)
    shapes = {"image": (3, 6, 8), "semseg": (6, 8), "parts": (6, 8), "depth": (1, 6, 8),
              "normals": (3, 6, 8), "edge": (1, 6, 8), "sal": (1, 6, 8)}  # fmt: skip
    for key, shape in shapes.items():
        assert out[key].shape == shape, key
        expected = torch.int64 if key in ("semseg", "parts") else torch.float32
        assert out[key].dtype == expected, key
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out["image"], expected)
    assert out["meta"] == sample["meta"]
    encoded = ToTensorNormalize()(_sample(encoded_normals=True))["normals"]
    torch.testing.assert_close(encoded, out["normals"], atol=5e-3, rtol=0)


def test_resize_protocol_and_builders() -> None:
    sample = _sample()
    out = Resize(3, 4)(sample)
    assert out["image"].shape == (3, 4, 3) and out["normals"].shape == (3, 4, 3)
    assert set(np.unique(out["depth"])) <= set(np.unique(sample["depth"]))  # depth kept
    torch.manual_seed(0)
    for protocol in ("pad", "resize"):
        train = train_transforms((4, 5), scale_range=(0.8, 1.2), protocol=protocol)(_sample())
        assert train["image"].shape == (3, 4, 5) and train["semseg"].dtype == torch.int64
    assert eval_transforms(8)(_sample())["depth"].shape == (1, 8, 8)
    assert eval_transforms((3, 4), protocol="resize")(_sample())["semseg"].shape == (3, 4)
    with pytest.raises(ValueError, match="unknown protocol"):
        eval_transforms(8, protocol="stretch")
