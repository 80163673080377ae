"""One rule set for the loader and the dataset checker: a file (or split list) the checker calls
bad is refused by the loader with the same message, labels are checked against the configured
class count, and PASCAL's object lists name the file they cannot read."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from PIL import Image

from mtl.data.base import DatasetError
from mtl.data.formats import part_annotation, write_nyud, write_pascal
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset
from mtl.data.skip import SKIPPED
from mtl.data.verify import main, verify
from mtl.train import build_datamodule

SIZE = (20, 24)
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]


def _set_png(path: Path, value: int) -> None:
    array = np.asarray(Image.open(path)).copy()
    array[2, 3] = value
    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------- synthetic classes


def test_synthetic_label_outside_its_five_classes_is_named_or_skipped(
    make_cfg, tiny_data_root, tmp_path
):
    build_datamodule(make_cfg().data).prepare_data()  # the shared tiny scenes, if not there yet
    root = tmp_path / "scenes"  # scenes generated elsewhere, then `data.root=...`
    shutil.copytree(tiny_data_root, root)
    train_ids = (root / "gt_sets" / "train.txt").read_text().split()
    bad = root / "segmentation" / f"{train_ids[3]}.png"
    _set_png(bad, 30)  # a NYUD class, not one of the 5 synthetic ones

    strict = build_datamodule(make_cfg(f"data.root={root}").data)
    strict.setup("fit")
    with pytest.raises(DatasetError) as info:
        strict.datasets["train"][3]
    assert str(bad) in str(info.value) and "values [30] not allowed (allowed: 0..5, 255)" in str(
        info.value
    )
    (problem,) = verify("synthetic", root)[0]  # the checker: same file, same words
    assert problem.path == str(bad) and str(problem) in str(info.value)

    skipping = build_datamodule(make_cfg(f"data.root={root}", "data.skip_bad=true").data)
    skipping.setup("fit")
    batches = list(skipping._loader("train", shuffle=False))
    assert sum(int(b[SKIPPED]) for b in batches) == 1
    loaded = [i for b in batches if "image" in b for i in b["meta"]["id"]]
    assert len(loaded) == len(train_ids) - 1 and train_ids[3] not in loaded
    assert max(int(b["semseg"][b["semseg"] != 255].max()) for b in batches if "image" in b) <= 4


def test_nyud_keeps_its_forty_classes(tmp_path):
    write_nyud(tmp_path, {"train": ["a"], "val": ["b"]}, "atrc", SIZE)
    _set_png(tmp_path / "segmentation" / "a.png", 40)
    assert int(NYUDDataset(tmp_path, "train", ["semseg"])[0]["semseg"][2, 3]) == 39
    _set_png(tmp_path / "segmentation" / "a.png", 41)
    with pytest.raises(DatasetError, match=r"values \[41\] not allowed \(allowed: 0..40, 255\)"):
        NYUDDataset(tmp_path, "train", ["semseg"])[0]


# --------------------------------------------------------------------------- PASCAL object lists


def _pascal_cfg(root: Path, tmp_path: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(
            config_name="train",
            overrides=[
                "data=pascal_context",
                f"data.root={root}",
                f"paths.root_dir={ROOT}",
                f"paths.data_dir={tmp_path / 'data'}",
                f"paths.output_dir={tmp_path / 'run'}",
                "data.num_workers=0",
                "data.batch_size=2",
                "data.tasks=[parts]",
                *overrides,
            ],
        )


def _empty_class_ind(path: Path) -> None:
    mask = np.ones(SIZE, np.uint8)
    anno = part_annotation("b", [("person", 15, mask, {"head": mask})])
    anno["anno"][0, 0]["objects"][0, 0]["class_ind"] = np.zeros((0, 0), np.uint8)
    scipy.io.savemat(path, anno)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot read .mat"),
        (_empty_class_ind, "malformed PASCAL-Part struct (empty class_ind"),
    ],
)
def test_pascal_object_lists_name_a_bad_part_file_or_leave_it_out(
    tmp_path, caplog, damage, message
):
    root = tmp_path / "pascal"
    write_pascal(root, {"train": ["a", "b", "c", "e"], "val": ["d"]}, SIZE, persons=["a", "b"])
    bad = root / "human_parts" / "b.mat"
    damage(bad)

    strict = build_datamodule(_pascal_cfg(root, tmp_path).data)
    with pytest.raises(DatasetError) as info:
        strict.setup("fit")
    assert f"{bad}" in str(info.value) and message in str(info.value), str(info.value)

    skipping = build_datamodule(_pascal_cfg(root, tmp_path, "data.skip_bad=true").data)
    with caplog.at_level(logging.WARNING):
        skipping.setup("fit")
    assert f"{bad}" in caplog.text and "left out" in caplog.text
    batches = list(skipping._loader("train", shuffle=False))
    assert sum(int(b[SKIPPED]) for b in batches) == 1
    loaded = [i for b in batches if "image" in b for i in b["meta"]["id"]]
    assert loaded == ["a", "c", "e"]


def test_pascal_object_lists_from_a_damaged_json_are_named_or_rebuilt(tmp_path):
    root = tmp_path / "pascal"
    write_pascal(root, {"train": ["a", "b"], "val": ["d"]}, SIZE, persons=["a"])
    cache = tmp_path / "cache"
    first = PASCALContextDataset(root, "train", ["parts"], cache_dir=cache)
    (stored,) = cache.iterdir()
    stored.write_text('{"a": [15, 7], "b"')  # cut short
    again = PASCALContextDataset(root, "train", ["parts"], cache_dir=cache)
    assert again._has_person == first._has_person == {"a": True, "b": False}
    assert json.loads(stored.read_text()) == {"a": [15, 7], "b": [7]}
    shipped = root / "ImageSets" / "Parts" / "train.txt"
    shipped.parent.mkdir()
    shipped.write_text("a 15\nb 7\n")  # not the JSON the release ships
    with pytest.raises(DatasetError, match=re.escape(f"{shipped}: expected a JSON object")):
        PASCALContextDataset(root, "train", ["parts"], cache_dir=cache)


# --------------------------------------------------------------------------- loader == checker


def _uint16_millimetres(path: Path) -> None:
    np.save(path, (np.load(path) * 1000).astype(np.uint16))


def _bool_depth(path: Path) -> None:
    np.save(path, np.load(path) > 0)


def _int_binary_npy(path: Path) -> None:
    np.save(path, np.full(SIZE, 2, np.int64))


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("depth/n1.npy", _uint16_millimetres, "expected float depth in metres, got uint16"),
        ("depth/n1.npy", _bool_depth, "expected float depth in metres, got bool"),
        ("edge/n1.npy", _int_binary_npy, "binary map values [2] not allowed"),
        ("segmentation/n1.png", lambda p: _set_png(p, 41), "values [41] not allowed"),
    ],
)
def test_loader_and_checker_refuse_a_bad_file_with_one_message(tmp_path, name, damage, message):
    root = tmp_path / "nyud"
    write_nyud(root, {"train": ["n0", "n1"], "val": ["n2"]}, "nyud_mt", SIZE)
    damage(root / name)
    problems = verify("nyud", root, allow_subset=True)[0]
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.path == str(root / name) and message in problem.message
    with pytest.raises(DatasetError) as info:
        NYUDDataset(root, "train", NYUD_TASKS)[1]
    assert str(problem) in str(info.value)


def test_an_id_listed_twice_is_refused_by_loader_and_checker(tmp_path, capsys):
    root = tmp_path / "nyud"
    write_nyud(root, {"train": ["n0", "n1"], "val": ["n2"]}, "atrc", SIZE)
    split = root / "gt_sets" / "train.txt"
    split.write_text("n0\nn1\nn0\n")
    problems = verify("nyud", root, allow_subset=True)[0]
    assert [str(p) for p in problems] == [f"{split}: ids listed more than once: ['n0']"]
    assert main(["--dataset", "nyud", "--root", str(root), "--allow-subset"]) == 1
    assert str(problems[0]) in capsys.readouterr().out
    with pytest.raises(DatasetError) as info:
        NYUDDataset(root, "train", NYUD_TASKS)
    assert str(problems[0]) in str(info.value)
