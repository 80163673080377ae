"""Batch augmentation on the device (``data.gpu_augment``), on small hand-made CPU batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl.data.gpu_augment import BatchAugment, decode_transforms
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtl.train import build_datamodule, train


def _batch(size: int = 2, height: int = 8, width: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, 4, (size, height, width), generator=g)
    semseg[:, 0, 0] = 255
    normals = torch.nn.functional.normalize(torch.randn(size, 3, height, width, generator=g), dim=1)
    return {
        "image": torch.randint(0, 256, (size, 3, height, width), generator=g, dtype=torch.uint8),
        "semseg": semseg,
        "depth": 1 + torch.rand(size, 1, height, width, generator=g),
        "normals": normals,
        "edge": (torch.rand(size, 1, height, width, generator=g) > 0.5).float(),
    }


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((image * std + mean) * 255).round()


def _only(**options) -> BatchAugment:
    defaults = {"scale_range": None, "flip": False, "photometric": False, "cat_max_ratio": 1.0}
    return BatchAugment(**{"crop_size": (8, 12), **defaults, **options})


def test_flip_mirrors_every_map_and_negates_normals_x():
    batch = _batch()
    augment = _only(flip=True)
    flipped = []
    for seed in range(20):  # find a seed flipping both samples
        out = augment(batch, seed=seed)
        if torch.equal(out["semseg"], batch["semseg"].flip(-1)):
            flipped.append(out)
            break
    assert flipped, "no seed flipped both samples"
    out = flipped[0]
    for key in ("semseg", "depth", "edge"):
        assert torch.equal(out[key], batch[key].flip(-1))
    assert torch.equal(out["normals"][:, 0], -batch["normals"][:, 0].flip(-1))
    assert torch.equal(out["normals"][:, 1:], batch["normals"][:, 1:].flip(-1))
    assert torch.allclose(_unnormalise(out["image"]), batch["image"].flip(-1).float(), atol=0.5)


def test_scaling_divides_depth_and_keeps_label_values():
    batch = _batch(size=1)
    batch["depth"][:] = 2.0
    augment = BatchAugment((8, 12), scale_range=(1.5, 1.5), flip=False, photometric=False)
    out = augment(batch, seed=0)
    assert torch.allclose(out["depth"], torch.full_like(out["depth"], 2.0 / 1.5))
    assert set(out["semseg"].unique().tolist()) <= set(batch["semseg"].unique().tolist()) | {255}
    assert set(out["edge"].unique().tolist()) <= {0.0, 1.0, 255.0}


@pytest.mark.parametrize("scale", [(0.5, 0.5), (1.0, 2.0)])
def test_output_shapes_equal_the_crop_size(scale):
    out = BatchAugment((6, 10), scale_range=scale)(_batch(size=3), seed=1)
    assert out["image"].shape == (3, 3, 6, 10) and out["image"].dtype == torch.float32
    assert out["semseg"].shape == (3, 6, 10) and out["semseg"].dtype == torch.int64
    assert out["depth"].shape == (3, 1, 6, 10) and out["normals"].shape == (3, 3, 6, 10)


def test_padding_uses_each_tasks_ignore_value():
    batch = _batch(size=1, height=4, width=6)
    out = _only(crop_size=(8, 12))(batch, seed=0)
    assert (out["semseg"][:, 4:] == 255).all() and (out["semseg"][:, :, 6:] == 255).all()
    assert (out["edge"][..., 4:, :] == 255).all()
    assert (out["depth"][..., 4:, :] == 0).all() and (out["normals"][..., 6:] == 0).all()
    assert torch.allclose(_unnormalise(out["image"])[..., 4:, :], torch.zeros(1))
    assert torch.equal(out["semseg"][:, :4, :6], batch["semseg"])


def test_worker_padding_is_cut_back_before_scaling():
    """A sample padded in the workers (meta pad) is scaled from its valid region only."""
    sample = {
        "image": np.full((4, 6, 3), 200, np.uint8),
        "semseg": np.ones((4, 6), np.uint8),
        "depth": np.full((4, 6), 3.0, np.float32),
        "meta": {"pad": (0, 0, 0, 0)},
    }
    decoded = decode_transforms((8, 12))(sample)
    assert decoded["image"].dtype == torch.uint8 and decoded["image"].shape == (3, 8, 12)
    assert (decoded["semseg"][4:] == 255).all() and (decoded["depth"][:, :, 6:] == 0).all()
    batch = torch.utils.data.default_collate([decoded])
    out = _only(scale_range=(2.0, 2.0))(batch, seed=0)
    assert (out["semseg"] == 1).all() and torch.allclose(out["depth"], torch.tensor(1.5))
    assert [int(p) for p in out["meta"]["pad"]] == [0, 0, 0, 0]


def test_cat_max_ratio_rejects_a_dominated_crop():
    """Left half one class, right half two: a window on the left half fails the rule."""
    semseg = torch.zeros(1, 8, 16, dtype=torch.int64)
    semseg[0, :, 8:12], semseg[0, :, 12:] = 1, 2
    batch = {"image": torch.zeros(1, 3, 8, 16, dtype=torch.uint8), "semseg": semseg}
    strict = _only(crop_size=(8, 8), cat_max_ratio=0.75, max_tries=50)
    free = _only(crop_size=(8, 8))
    free_dominated = strict_dominated = 0
    for seed in range(30):
        for augment, counter in ((strict, "strict"), (free, "free")):
            labels = augment(batch, seed=seed)["semseg"]
            share = torch.bincount(labels.flatten()).max().item() / labels.numel()
            if share >= 0.75:
                if counter == "strict":
                    strict_dominated += 1
                else:
                    free_dominated += 1
    assert free_dominated > 0 and strict_dominated == 0


def test_photometric_changes_only_the_image():
    batch = _batch(size=4)
    plain = _only()(batch, seed=3)
    jittered = _only(photometric=True)(batch, seed=3)
    for key in ("semseg", "depth", "normals", "edge"):
        assert torch.equal(jittered[key], plain[key])
    assert not torch.equal(jittered["image"], plain["image"])
    pixels = _unnormalise(jittered["image"])
    assert pixels.min() >= 0 and pixels.max() <= 255


def test_a_fixed_seed_gives_identical_outputs():
    batch = _batch(size=3)
    augment = BatchAugment((6, 10), scale_range=(0.5, 2.0))
    first, second = augment(batch, seed=7), augment(batch, seed=7)
    other = augment(batch, seed=8)
    for key in batch:
        assert torch.equal(first[key], second[key])
    assert any(
        not torch.equal(first[k], other[k]) for k in batch if first[k].shape == other[k].shape
    )


def test_one_batch_fit_with_gpu_augment(make_cfg, monkeypatch):
    cfg = make_cfg("data.gpu_augment=true", "debug=fdr")
    assert build_datamodule(cfg.data).gpu_augment is not None
    shapes = []
    original = BatchAugment.__call__

    def recording(self, batch, seed=None):
        out = original(self, batch, seed=seed)
        shapes.append((batch["image"].dtype, out["image"].dtype, tuple(out["image"].shape)))
        return out

    monkeypatch.setattr(BatchAugment, "__call__", recording)
    scores = train(cfg)
    assert "val/loss" in scores
    assert shapes == [(torch.uint8, torch.float32, (4, 3, 48, 64))]  # training batches only
