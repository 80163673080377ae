"""Tests for the label-aware joint transforms on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl.data.transforms import (
    Compose,
    Normalize,
    PadTo,
    PhotometricDistortion,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    ToTensor,
    eval_transforms,
    train_transforms,
)


def _sample(h: int = 6, w: int = 8) -> dict:
    """A sample whose every map encodes the pixel position, so moves are traceable."""
    yy, xx = np.mgrid[0:h, 0:w]
    normals = np.zeros((h, w, 3), dtype=np.float32)
    normals[..., 0] = 0.6
    normals[..., 2] = 0.8
    normals[0, 0] = 0.0
    return {
        "image": np.stack([yy / h, xx / w, np.full((h, w), 0.5)], -1).astype(np.float32),
        "semseg": (xx % 3).astype(np.int64),
        "depth": (1.0 + xx + 10 * yy).astype(np.float32),
        "normals": normals,
        "edge": (yy == 2).astype(np.float32),
        "sal": (xx < 2).astype(np.float32),
        "meta": {"id": "x", "orig_size": (h, w), "pad": (0, 0, 0, 0)},
    }


def test_flip_mirrors_everything_and_negates_normals_x() -> None:
    sample = _sample()
    out = RandomHorizontalFlip(p=1.0)(sample)
    for key in ("image", "semseg", "depth", "edge", "sal"):
        np.testing.assert_array_equal(out[key], sample[key][:, ::-1], err_msg=key)
    np.testing.assert_array_equal(out["normals"][..., 0], -sample["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(out["normals"][..., 1:], sample["normals"][:, ::-1, 1:])
    assert sample["normals"][0, 1, 0] == pytest.approx(0.6)  # input untouched
    assert RandomHorizontalFlip(p=0.0)(sample) is sample


def test_flip_swaps_recorded_left_right_padding() -> None:
    sample = PadTo(6, 10)(_sample())
    assert RandomHorizontalFlip(p=1.0)(sample)["meta"]["pad"] == (0, 0, 2, 0)


def test_scale_by_two_divides_depth_and_keeps_label_sets() -> None:
    sample = _sample()
    out = RandomScale(2.0, 2.0)(sample)
    assert out["image"].shape == (12, 16, 3)
    np.testing.assert_array_equal(out["depth"][::2, ::2], sample["depth"] / 2)
    np.testing.assert_array_equal(out["semseg"][1::2, 1::2], sample["semseg"])
    for key in ("semseg", "edge", "sal"):
        assert set(np.unique(out[key])) == set(np.unique(sample[key])), key
    assert out["semseg"].dtype == np.int64
    norms = np.linalg.norm(out["normals"], axis=-1)
    assert set(np.round(np.unique(norms), 6)) == {0.0, 1.0}


def test_resize_keeps_depth_values() -> None:
    sample = _sample()
    out = Resize(3, 4)(sample)
    assert out["image"].shape == (3, 4, 3) and out["normals"].shape == (3, 4, 3)
    assert set(np.unique(out["depth"])) <= set(np.unique(sample["depth"]))


def test_crop_respects_cat_max_ratio() -> None:
    semseg = np.zeros((20, 20), dtype=np.int64)
    semseg[:10, :10] = 1  # class 0 dominates 3/4 of the image
    semseg[15:, 15:] = 255
    sample = {"image": np.zeros((20, 20, 3), np.float32), "semseg": semseg}
    crop = RandomCrop(10, 10, cat_max_ratio=0.75, max_tries=50)
    torch.manual_seed(0)
    for _ in range(20):
        window = crop(sample)["semseg"]
        assert window.shape == (10, 10)
        labels, counts = np.unique(window[window != 255], return_counts=True)
        assert len(labels) == 2 and counts.max() / counts.sum() < 0.75


def test_crop_pads_small_samples_with_ignore_values() -> None:
    out = RandomCrop(8, 10)(_sample())
    assert out["semseg"].shape == (8, 10)
    assert (out["semseg"][6:] == 255).all() and (out["edge"][:, 8:] == 255).all()
    assert (out["depth"][6:] == 0).all() and (out["normals"][:, 8:] == 0).all()
    assert out["meta"]["pad"] == (0, 2, 0, 2)


def test_pad_to_uses_ignore_values_and_records_meta() -> None:
    sample = _sample()
    out = PadTo(8, 11)(sample)
    assert out["meta"]["pad"] == (0, 2, 0, 3)
    assert out["image"].shape == (8, 11, 3)
    for key, value in (("semseg", 255), ("edge", 255), ("sal", 255), ("depth", 0), ("image", 0)):
        assert (out[key][6:] == value).all() and (out[key][:, 8:] == value).all(), key
    assert (out["normals"][6:] == 0).all()
    np.testing.assert_array_equal(out["depth"][:6, :8], sample["depth"])
    with pytest.raises(ValueError, match="smaller"):
        PadTo(4, 8)(sample)


def test_photometric_changes_image_only() -> None:
    sample = _sample()
    torch.manual_seed(1)
    out = Compose([PhotometricDistortion()] * 4)(sample)
    assert out["image"].dtype == np.float32
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
    assert not np.array_equal(out["image"], sample["image"])
    for key in ("semseg", "depth", "normals", "edge", "sal"):
        assert out[key] is sample[key]


def test_to_tensor_normalize_contract() -> None:
    sample = _sample()
    out = Normalize()(ToTensor()(sample))
    shapes = {
        "image": (3, 6, 8),
        "semseg": (6, 8),
        "depth": (1, 6, 8),
        "normals": (3, 6, 8),
        "edge": (1, 6, 8),
        "sal": (1, 6, 8),
    }
    for key, shape in shapes.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == (torch.int64 if key == "semseg" else torch.float32), key
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = (torch.from_numpy(sample["image"]).permute(2, 0, 1) - mean) / std
    torch.testing.assert_close(out["image"], expected)
    assert out["meta"] == sample["meta"]


def test_builders_produce_contract() -> None:
    torch.manual_seed(0)
    out = train_transforms((4, 5), scale_range=(0.8, 1.2))(_sample())
    assert out["image"].shape == (3, 4, 5) and out["semseg"].dtype == torch.int64
    assert eval_transforms(pad_size=8)(_sample())["depth"].shape == (1, 8, 8)
