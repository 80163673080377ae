"""Bad sample files make the loader raise `DatasetError` naming the file and the problem; with
``data.skip_bad`` they are left out, counted, and the count reported per epoch."""

from __future__ import annotations

import csv
import logging
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mtl.data.base import DatasetError
from mtl.data.datamodule import MultiTaskDataModule
from mtl.data.formats import encode_normals, write_nyud, write_pascal
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset
from mtl.data.skip import SKIPPED
from mtl.train import build_datamodule, train

SIZE = (24, 32)
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]
PASCAL_TASKS = ["semseg", "parts", "sal", "normals", "edge"]


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _save_npy(path: Path, change) -> None:
    array = np.load(path)
    change(array)
    np.save(path, array)


def _set_png(path: Path, value) -> None:
    array = np.asarray(Image.open(path)).copy()
    array[0, 0] = value
    Image.fromarray(array).save(path)


# (variant, file under root, how to damage it, what the message must say)
NYUD_FAULTS = [
    ("nyud_mt", "images/s1.jpg", _truncate, "cannot decode image"),
    ("nyud_mt", "images/s1.jpg", partial(_truncate, keep=0.97), "cannot decode image"),
    ("atrc", "images/s1.png", _truncate, "cannot decode image"),
    ("nyud_mt", "images/s1.jpg", lambda p: p.write_bytes(b"\xff\xd8garbage"), "cannot decode"),
    ("atrc", "depth/s1.npy", _truncate, "cannot read .npy"),
    ("atrc", "depth/s1.npy", partial(_save_npy, change=lambda a: a.__setitem__((0, 0), np.nan)),
     "1 non-finite depth values"),
    ("nyud_mt", "depth/s1.npy", partial(_save_npy, change=lambda a: a.__setitem__((2, 3), -1.0)),
     "1 negative depth values"),
    ("atrc", "segmentation/s1.png", partial(_set_png, value=41), "values [41] not allowed"),
    ("atrc", "segmentation/s1.png",
     lambda p: Image.fromarray(np.ones((SIZE[0] + 2, SIZE[1]), np.uint8)).save(p),
     f"semseg has size {(SIZE[0] + 2, SIZE[1])}"),
    ("nyud_mt", "normals/s1.npy", partial(_save_npy, change=lambda a: a.__imul__(0.8)),
     "valid normals are not unit length"),
    ("nyud_mt", "normals/s1.npy",
     partial(_save_npy, change=lambda a: a.__setitem__((1, 1, 0), np.nan)),
     "1 of"),
    ("atrc", "normals/s1.png",
     lambda p: Image.fromarray(encode_normals(np.full((*SIZE, 3), 0.4, np.float32))).save(p),
     "valid normals are not unit length"),
    ("atrc", "edge/s1.png", partial(_set_png, value=7), "binary map values [7] not allowed"),
    ("nyud_mt", "edge/s1.npy", partial(_save_npy, change=lambda a: a.__setitem__((0, 0), 0.5)),
     "expected integer binary map values"),
    ("atrc", "images/s1.png", lambda p: p.unlink(), "missing image"),
]  # fmt: skip


@pytest.mark.parametrize(("variant", "name", "damage", "message"), NYUD_FAULTS)
def test_nyud_fault_raises_dataset_error_naming_file(tmp_path, variant, name, damage, message):
    write_nyud(tmp_path, {"train": ["s0", "s1", "s2"], "val": ["v"]}, variant, SIZE)
    dataset = NYUDDataset(tmp_path, "train", NYUD_TASKS)
    dataset[1]  # sound before the damage
    damage(tmp_path / name)
    dataset[0], dataset[2]  # the other samples still load
    with pytest.raises(DatasetError) as info:
        dataset[1]
    text = str(info.value)
    assert str(tmp_path / Path(name).parent) in text and "s1" in text, text
    assert message in text, text


def _pascal_labels(path: Path, value: int) -> None:
    labels = scipy.io.loadmat(path)["LabelMap"]
    labels[0, 0] = value
    scipy.io.savemat(path, {"LabelMap": labels})


PASCAL_FAULTS = [
    ("JPEGImages/a.jpg", partial(_truncate, keep=0.97), "cannot decode image"),
    ("semseg/VOC12/a.png", partial(_set_png, value=25), "values [25] not allowed"),
    ("pascal-context/trainval/a.mat", partial(_pascal_labels, value=460),
     "LabelMap values [460] outside 0..459"),
    ("pascal-context/trainval/a.mat", _truncate, "cannot read .mat"),
    ("human_parts/a.mat", _truncate, "cannot read .mat"),
    ("normals_distill/a.png", _truncate, "cannot decode PNG"),
    ("sal_distill/a.png", lambda p: Image.fromarray(np.zeros((5, 5), np.uint8)).save(p),
     "sal has size (5, 5)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "damage", "message"), PASCAL_FAULTS)
def test_pascal_fault_raises_dataset_error_naming_file(tmp_path, name, damage, message):
    root = tmp_path / "pascal"
    write_pascal(root, {"train": ["a", "b"], "val": ["c"]}, SIZE, persons=["a", "b"])
    dataset = PASCALContextDataset(root, "train", PASCAL_TASKS, cache_dir=tmp_path / "cache")
    dataset[0]
    damage(root / name)
    with pytest.raises(DatasetError) as info:
        dataset[0]
    text = str(info.value)
    assert str(root / Path(name).parent) in text and message in text, text


def test_pascal_normals_not_unit_where_valid_raise(tmp_path):
    root = tmp_path / "pascal"
    write_pascal(root, {"train": ["a"], "val": ["c"]}, SIZE)
    labels = scipy.io.loadmat(root / "pascal-context/trainval/a.mat")["LabelMap"]
    labels[:] = 18  # "bed": a class with valid normals everywhere
    scipy.io.savemat(root / "pascal-context/trainval/a.mat", {"LabelMap": labels})
    dataset = PASCALContextDataset(root, "train", ["normals"])
    dataset[0]
    short = encode_normals(np.full((*SIZE, 3), 0.45, np.float32))  # |n| = 0.78
    Image.fromarray(short).save(root / "normals_distill" / "a.png")
    with pytest.raises(DatasetError, match=r"normals_distill.a\.png: .* not unit length"):
        dataset[0]


def test_a_cut_file_lacks_its_end_marker():
    from mtl.data.io import truncation_problem

    jpeg = np.frombuffer(b"\xff\xd8\xff\xe0" + bytes(2000) + b"\xff\xd9", np.uint8)
    png = np.frombuffer(b"\x89PNG\r\n\x1a\n" + bytes(2000) + b"IEND\xaeB`\x82", np.uint8)
    assert truncation_problem(jpeg) is None and truncation_problem(png) is None
    assert "truncated JPEG" in truncation_problem(jpeg[:-100])
    assert "truncated PNG" in truncation_problem(png[:-12])


# --------------------------------------------------------------------------- skip_bad


def test_skip_bad_counts_dropped_samples_through_worker_processes(tmp_path):
    ids = [f"s{i}" for i in range(8)]
    write_nyud(tmp_path, {"train": ids, "val": ["v"]}, "atrc", SIZE)
    _truncate(tmp_path / "images" / "s2.png")
    _save_npy(tmp_path / "depth" / "s5.npy", lambda a: a.__setitem__((0, 0), np.inf))
    datamodule = MultiTaskDataModule(
        dataset=partial(NYUDDataset, root=tmp_path),
        tasks=NYUD_TASKS,
        batch_size=4,
        num_workers=2,
        check_files=0,
        skip_bad=True,
    )
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader()) + list(datamodule._loader("train", False))
    skipped = sum(int(b[SKIPPED]) for b in batches)
    loaded = sum(len(b["meta"]["id"]) for b in batches if "image" in b)
    assert skipped == 2 and loaded == 1 + 6
    assert not {"s2", "s5"} & {i for b in batches if "image" in b for i in b["meta"]["id"]}

    strict = MultiTaskDataModule(
        dataset=partial(NYUDDataset, root=tmp_path), tasks=NYUD_TASKS, batch_size=4, check_files=0
    )
    strict.setup("fit")
    with pytest.raises(DatasetError, match=r"s2\.png"):
        list(strict._loader("train", False))


def test_skip_bad_run_logs_the_count_per_epoch(make_cfg, tiny_data_root, tmp_path, caplog):
    build_datamodule(make_cfg().data).prepare_data()  # the shared tiny scenes, if not there yet
    root = tmp_path / "scenes"
    shutil.copytree(tiny_data_root, root)
    train_ids = (root / "gt_sets" / "train.txt").read_text().split()
    _truncate(root / "depth" / f"{train_ids[1]}.npy")
    _set_png(root / "segmentation" / f"{train_ids[6]}.png", 99)
    cfg = make_cfg(
        f"data.root={root}",
        "data.skip_bad=true",
        "data.num_workers=1",
        "trainer.max_epochs=1",
        "+trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "diagnostics_every_n_steps=0",
        "model.decoder.hidden_channels=8",
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "epoch 0: 2 bad train sample(s) skipped" in caplog.text
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("data/skipped")]
    assert [float(r["data/skipped"]) for r in rows] == [2.0]
