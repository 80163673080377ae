"""Tests for the PASCAL-Context multi-task reader: files written in the PASCAL_MT formats, and
real PASCAL-Part annotation files (shared fixtures) for the human-parts mapping."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mtl.data.edges import label_edges, thin
from mtl.data.formats import part_annotation, write_pascal
from mtl.data.pascal_context import (
    NORMALS_VALID_CLASSES,
    PART_OF,
    PASCALContextDataset,
    object_classes,
    read_parts,
)

TASKS = ("semseg", "parts", "sal", "normals", "edge")
SIZE = (30, 40)
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pascal_part_real"  # see its SOURCE.md
PERSON_IDS = {"2008_000652", "2008_000700", "2008_000726", "2008_000939", "2008_003228",
              "2009_001103", "2010_002526", "2010_005243"}  # fmt: skip


@pytest.fixture(scope="module")
def pascal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pascal") / "PASCAL_MT"
    splits = {"train": ["p0", "p1", "p2"], "val": ["p3", "p4"]}
    written = write_pascal(root, splits, SIZE, persons=["p0", "p3"], voc_ids=["p0", "p2"])
    return root, written


def test_every_target_decodes_to_the_written_values(pascal, tmp_path: Path) -> None:
    root, written = pascal
    ds = PASCALContextDataset(root, "train", TASKS, cache_dir=tmp_path)
    assert PASCALContextDataset.available_tasks(root) == list(TASKS)
    classes_seen = set()
    for index, sample_id in enumerate(ds.ids):
        raw, sample = written[sample_id], ds.load_sample(index)
        assert sample["meta"] == {"id": sample_id, "orig_size": SIZE, "pad": (0, 0, 0, 0)}
        np.testing.assert_array_equal(sample["semseg"], raw["semseg"])
        np.testing.assert_array_equal(sample["sal"], raw["sal"] > 127)
        np.testing.assert_array_equal(sample["edge"], label_edges(raw["context"]))
        valid = np.isin(raw["context"], list(NORMALS_VALID_CLASSES))
        classes_seen |= set(np.unique(valid))
        np.testing.assert_array_equal(sample["normals"][valid], raw["normals"][valid])
        assert (sample["normals"][~valid] == 128).all()  # the invalid code: decodes to zero
    assert classes_seen == {False, True}  # both kinds of Context class occurred
    tensors = ds[0]
    assert tensors["parts"].dtype.is_floating_point is False and tensors["parts"].shape == SIZE
    assert tensors["normals"].shape == (3, *SIZE) and tensors["edge"].shape == (1, *SIZE)


def test_semseg_prefers_voc12_and_falls_back_to_context(pascal) -> None:
    root, _ = pascal
    ds = PASCALContextDataset(root, "train", ["semseg"])
    assert ds.files("p0")["semseg"] == root / "semseg" / "VOC12" / "p0.png"
    assert ds.files("p1")["semseg"] == root / "semseg" / "pascal-context" / "p1.png"


def test_saliency_threshold_and_normals_mask_on_hand_values(tmp_path: Path) -> None:
    root = tmp_path / "PASCAL_MT"
    write_pascal(root, {"val": ["q"]}, (4, 4))
    Image.fromarray(np.array([[0, 127, 128, 255]] * 4, np.uint8)).save(root / "sal_distill/q.png")
    labels = np.full((4, 4), 360, np.uint16)  # sky: no normals
    labels[:, 2:] = 158  # floor: normals
    scipy.io.savemat(root / "pascal-context/trainval/q.mat", {"LabelMap": labels})
    sample = PASCALContextDataset(root, "val", ["sal", "normals"])[0]
    np.testing.assert_array_equal(sample["sal"][0].numpy(), [[0, 0, 1, 1]] * 4)
    assert (sample["normals"][:, :, :2] == 0).all()
    norms = sample["normals"][:, :, 2:].norm(dim=0)
    assert ((norms - 1).abs() < 1e-5).all()


def test_edges_are_the_thinned_nonzero_laplacian() -> None:
    labels = np.zeros((9, 12), np.uint16)
    labels[:, 6:] = 440  # one vertical boundary
    edges = label_edges(labels)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 1}
    assert edges[1:-1].sum(axis=1).tolist() == [1] * 7  # one pixel wide (thinning may
    assert edges.sum() <= 9  # shorten a line's ends)
    assert set(np.nonzero(edges)[1]) <= {5, 6}
    square = np.zeros((7, 7), bool)
    square[2:5, 2:5] = True
    assert thin(square).sum() == 1  # a filled square thins to its centre


def test_parts_mapping_on_written_annotations(tmp_path: Path) -> None:
    mask = np.zeros((6, 8), np.uint8)
    mask[1:5, 1:5] = 1
    parts = {name: np.zeros_like(mask) for name in ("hair", "neck", "ruarm", "lhand", "ruleg",
                                                    "lfoot")}  # fmt: skip
    for row, name in enumerate(parts):
        parts[name][row, 1:5] = 1
    path = tmp_path / "a.mat"
    scipy.io.savemat(path, part_annotation("a", [("dog", 12, mask, {"head": mask}),
                                                 ("person", 15, mask, parts)]))  # fmt: skip
    target = read_parts(path)
    assert target[:, 0].tolist() == [0] * 6  # outside the person: background
    assert target[:, 2].tolist() == [1, 2, 3, 4, 5, 6]  # one row per part, 6-part grouping
    assert object_classes(path) == [12, 15]
    scipy.io.savemat(path, part_annotation("a", [("person", 15, mask, {})]))  # no parts
    assert read_parts(path) is None
    assert sorted(set(PART_OF.values())) == [1, 2, 3, 4, 5, 6]


def test_person_free_images_are_all_ignore_and_object_lists_cached_outside_root(
    pascal, tmp_path: Path
) -> None:
    root, _ = pascal
    cache = tmp_path / "cache"
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    ds = PASCALContextDataset(root, "train", ["parts"], cache_dir=cache)
    assert (ds[0]["parts"] != 255).any()  # p0 has a person
    assert (ds[1]["parts"] == 255).all() and (ds[2]["parts"] == 255).all()
    (cached,) = cache.iterdir()
    assert json.loads(cached.read_text()) == {"p0": [15, 7], "p1": [7], "p2": [7]}
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written
    again = PASCALContextDataset(root, "train", ["parts"], cache_dir=cache)
    assert again._has_person == {"p0": True, "p1": False, "p2": False}


def test_edge_eval_list_selects_val_ids(pascal, tmp_path: Path) -> None:
    root, _ = pascal
    listing = tmp_path / "test_new.txt"
    listing.write_text("p4\nnot_in_val\n")
    ds = PASCALContextDataset(root, "val", ["edge"], edge_eval_list=listing)
    assert ds.edge_eval_ids == ["p4"]
    assert PASCALContextDataset(root, "val", ["edge"]).edge_eval_ids == ["p3", "p4"]


# ----------------------------------------------------------------------- real PASCAL-Part files


def test_real_part_files_give_part_maps_exactly_for_the_person_images() -> None:
    for path in sorted((FIXTURE / "human_parts").glob("*.mat")):
        target = read_parts(path)
        with Image.open(FIXTURE / "JPEGImages" / f"{path.stem}.jpg") as image:
            width, height = image.size
        if path.stem in PERSON_IDS:
            assert target is not None and target.shape == (height, width), path.stem
            assert set(np.unique(target)) <= set(range(7)) and (target > 0).any(), path.stem
        else:
            assert target is None, path.stem
    target = read_parts(FIXTURE / "human_parts" / "2008_000652.mat")
    assert set(np.unique(target)) == set(range(7))  # all six parts visible in this one


def test_real_files_through_the_dataset_read_only_root(tmp_path: Path) -> None:
    """The fixture root (read-only) as a dataset, with and without the shipped object lists."""
    for split in ("train", "val"):
        ds = PASCALContextDataset(FIXTURE, split, ["parts"], cache_dir=tmp_path / "unused")
        for index, sample_id in enumerate(ds.ids):
            parts = ds[index]["parts"]
            assert (parts != 255).any() == (sample_id in PERSON_IDS), sample_id
    assert not (tmp_path / "unused").exists()  # the release's ImageSets/Parts lists were used

    root = tmp_path / "copy"  # the same files without ImageSets/Parts: lists built and cached
    for folder in ("JPEGImages", "human_parts"):
        shutil.copytree(FIXTURE / folder, root / folder)
    shutil.copytree(FIXTURE / "ImageSets" / "Context", root / "ImageSets" / "Context")
    for path in root.rglob("*"):
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    os.chmod(root, 0o555)
    try:
        ds = PASCALContextDataset(root, "val", ["parts"], cache_dir=tmp_path / "cache")
        shipped = json.loads((FIXTURE / "ImageSets" / "Parts" / "val.txt").read_text())
        (cached,) = (tmp_path / "cache").iterdir()
        assert json.loads(cached.read_text()) == shipped
        assert {i for i in ds.ids if (ds[ds.ids.index(i)]["parts"] != 255).any()} == (
            PERSON_IDS & set(ds.ids)
        )
    finally:
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755)
