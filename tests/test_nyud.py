"""Tests for the NYUD-v2 dataset reader on tiny hand-written datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from mtl.data.base import DatasetError
from mtl.data.formats import write_nyud
from mtl.data.nyud import NYUDDataset
from mtl.data.transforms import eval_transforms

H, W = 24, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDS = ("a0", "a1", "a2")
TASKS = ("semseg", "depth", "normals", "edge")

# Raw segmentation: 0 (unlabeled) in the top rows, classes 1..3 elsewhere.
RAW_SEG = np.tile(np.arange(W, dtype=np.uint8) % 4, (H, 1))
RAW_SEG[:2] = 0
DEPTH = np.linspace(0.5, 5.0, H * W, dtype=np.float32).reshape(H, W)
DEPTH[:, :3] = 0.0
EDGE = np.zeros((H, W), dtype=np.uint8)
EDGE[H // 2] = 1


def _write_common(root: Path, ids: tuple[str, ...]) -> None:
    for folder in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / folder).mkdir(parents=True)
    (root / "gt_sets" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "gt_sets" / "val.txt").write_text(ids[0] + "\n")
    for sample_id in ids:
        Image.fromarray(RAW_SEG, mode="L").save(root / "segmentation" / f"{sample_id}.png")
        np.save(root / "depth" / f"{sample_id}.npy", DEPTH)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture
def nyud_mt(tmp_path: Path) -> Path:
    """NYUD_MT variant: jpg images, npy normals and edges."""
    root = tmp_path / "nyud_mt"
    _write_common(root, IDS)
    normals = np.zeros((H, W, 3), dtype=np.float32)
    normals[..., 2] = 1.0 + 1e-3  # valid, within the unit-length tolerance
    normals[0, 0] = 0.0  # invalid
    for i, sample_id in enumerate(IDS):
        Image.fromarray(_image(i)).save(root / "images" / f"{sample_id}.jpg")
        np.save(root / "normals" / f"{sample_id}.npy", normals)
        np.save(root / "edge" / f"{sample_id}.npy", EDGE)
    return root


@pytest.fixture
def atrc(tmp_path: Path) -> Path:
    """ATRC/InvPT variant (png images, normals, edges) plus saliency."""
    root = tmp_path / "atrc"
    _write_common(root, IDS)
    (root / "saliency").mkdir()
    normals = np.full((H, W, 3), 201, dtype=np.uint8)  # (1, 1, 1) / sqrt(3), encoded
    normals[0, 0] = (127, 127, 127)  # decodes to ~0: invalid
    normals[0, 1] = (128, 128, 128)  # decodes to ~0: invalid
    normals[0, 2] = (201, 54, 201)  # (1, -1, 1) / sqrt(3)
    for i, sample_id in enumerate(IDS):
        Image.fromarray(_image(i)).save(root / "images" / f"{sample_id}.png")
        Image.fromarray(normals).save(root / "normals" / f"{sample_id}.png")
        Image.fromarray(EDGE * 255).save(root / "edge" / f"{sample_id}.png")
        Image.fromarray(EDGE * 255).save(root / "saliency" / f"{sample_id}.png")
    return root


def _check_contract(sample: dict, tasks: tuple[str, ...], size: tuple[int, int]) -> None:
    shapes = {
        "semseg": size,
        "depth": (1, *size),
        "normals": (3, *size),
        "edge": (1, *size),
        "sal": (1, *size),
    }
    assert sample["image"].dtype == torch.float32
    assert sample["image"].shape == (3, *size)
    for task in tasks:
        expected_dtype = torch.int64 if task == "semseg" else torch.float32
        assert sample[task].dtype == expected_dtype, task
        assert sample[task].shape == shapes[task], task


def test_nyud_mt_contract_and_labels(nyud_mt: Path) -> None:
    ds = NYUDDataset(nyud_mt, "train", TASKS)
    assert len(ds) == 3
    sample = ds[1]
    _check_contract(sample, TASKS, (H, W))
    assert sample["meta"] == {"id": "a1", "orig_size": (H, W), "pad": (0, 0, 0, 0)}

    semseg = sample["semseg"].numpy()
    expected = np.where(RAW_SEG == 0, 255, RAW_SEG.astype(np.int64) - 1)
    np.testing.assert_array_equal(semseg, expected)
    assert set(np.unique(semseg)) == {0, 1, 2, 255}

    np.testing.assert_allclose(sample["depth"][0].numpy(), DEPTH)
    assert (sample["depth"][0, :, :3] == 0).all()
    normals = sample["normals"].numpy()
    np.testing.assert_array_equal(normals[:, 0, 0], 0.0)
    np.testing.assert_allclose(normals[:, 5, 5], (0.0, 0.0, 1.0))
    np.testing.assert_array_equal(sample["edge"][0].numpy(), EDGE)


def test_image_is_imagenet_normalised(atrc: Path) -> None:
    sample = NYUDDataset(atrc, "val", ["depth"])[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    raw = torch.from_numpy(_image(0)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(sample["image"], (raw - mean) / std)


def test_atrc_png_decoding(atrc: Path) -> None:
    tasks = (*TASKS, "sal")
    sample = NYUDDataset(atrc, "train", tasks)[0]
    _check_contract(sample, tasks, (H, W))
    normals = sample["normals"].numpy()
    np.testing.assert_array_equal(normals[:, 0, :2], 0.0)
    np.testing.assert_allclose(normals[:, 0, 2], np.array([1, -1, 1]) / np.sqrt(3), atol=1e-6)
    np.testing.assert_allclose(normals[:, 5, 5], np.ones(3) / np.sqrt(3), atol=1e-6)
    np.testing.assert_array_equal(sample["edge"][0].numpy(), EDGE)
    np.testing.assert_array_equal(sample["sal"][0].numpy(), EDGE)


def test_default_collate_and_eval_padding(atrc: Path) -> None:
    ds = NYUDDataset(atrc, "train", TASKS, transform=eval_transforms((32, 40)))
    batch = default_collate([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 32, 40)
    assert batch["semseg"].shape == (2, 32, 40)
    assert (batch["semseg"][:, H:] == 255).all()
    assert (batch["depth"][:, :, :, W:] == 0).all()
    assert batch["meta"]["id"] == ["a0", "a2"]
    assert [int(v[0]) for v in batch["meta"]["pad"]] == [0, 8, 0, 8]
    assert [int(v[0]) for v in batch["meta"]["orig_size"]] == [H, W]


def test_available_tasks(nyud_mt: Path, atrc: Path) -> None:
    assert NYUDDataset.available_tasks(nyud_mt) == list(TASKS)
    assert NYUDDataset.available_tasks(atrc) == [*TASKS, "sal"]


def test_missing_task_folder_and_unknown_task(nyud_mt: Path) -> None:
    with pytest.raises(DatasetError, match=r"no files for task\(s\) \['sal'\]") as info:
        NYUDDataset(nyud_mt, "train", ["sal"])
    assert str(nyud_mt) in str(info.value) and "saliency" not in str(info.value).split("\n")[0]
    with pytest.raises(DatasetError, match="'albedo'"):
        NYUDDataset(nyud_mt, "train", ["albedo"])


def test_missing_root_names_the_layout_and_the_readme(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        NYUDDataset(tmp_path / "nowhere", "train", TASKS)
    message = str(info.value)
    assert "folder not found" in message and str(tmp_path / "nowhere") in message
    assert "gt_sets/train.txt" in message and "datasets/README.md" in message


def test_missing_split_file(nyud_mt: Path) -> None:
    with pytest.raises(DatasetError, match=r"split file not found: .*test\.txt"):
        NYUDDataset(nyud_mt, "test", TASKS)


def test_missing_item_file(nyud_mt: Path) -> None:
    (nyud_mt / "depth" / "a2.npy").unlink()
    ds = NYUDDataset(nyud_mt, "train", TASKS)
    ds[1]
    with pytest.raises(DatasetError, match=r"sample 'a2': missing depth .*depth[/\\]a2\.npy"):
        ds[2]


@pytest.mark.parametrize("variant", ["nyud_mt", "atrc"])
def test_release_formats_decode_to_the_written_values(tmp_path: Path, variant: str) -> None:
    """Files written as each release stores them decode to the values that were written."""
    size = (45, 60)
    written = write_nyud(tmp_path, {"train": ["s0", "s1"], "val": ["s2"]}, variant, size)
    ds = NYUDDataset(tmp_path, "train", TASKS)
    for index, sample_id in enumerate(ds.ids):
        raw, sample = written[sample_id], ds[index]
        _check_contract(sample, TASKS, size)
        expected = np.where(raw["semseg"] == 0, 255, raw["semseg"].astype(np.int64) - 1)
        np.testing.assert_array_equal(sample["semseg"].numpy(), expected)
        np.testing.assert_array_equal(sample["depth"][0].numpy(), raw["depth"])
        np.testing.assert_array_equal(sample["edge"][0].numpy(), raw["edge"])
        normals = sample["normals"].permute(1, 2, 0).numpy()
        valid = raw["depth"] > 0  # the writer leaves normals invalid in depth holes
        np.testing.assert_array_equal(normals[~valid], 0.0)
        tolerance = 1e-6 if variant == "nyud_mt" else 8e-3  # PNG quantisation
        np.testing.assert_allclose(normals[valid], raw["normals"][valid], atol=tolerance)
        if variant == "atrc":  # lossless PNG image
            image = sample["image"] * torch.tensor(STD).view(3, 1, 1)
            image = image + torch.tensor(MEAN).view(3, 1, 1)
            restored = (image * 255).round().permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(restored, raw["image"])


def test_jpg_images_of_480x640_need_no_padding_to_448x576(tmp_path: Path) -> None:
    write_nyud(tmp_path, {"train": ["s0"]}, "nyud_mt", size=(48, 64))
    sample = NYUDDataset(tmp_path, "train", TASKS, eval_transforms((44, 56)))[0]
    assert sample["image"].shape == (3, 48, 64) and sample["meta"]["pad"] == (0, 0, 0, 0)
