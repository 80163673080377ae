"""The dataset checker finds each planted fault and names the file; the datamodule's setup
check fails with the same report."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mtl.data.base import DatasetError
from mtl.data.datamodule import MultiTaskDataModule
from mtl.data.formats import encode_normals, part_annotation, write_nyud, write_pascal
from mtl.data.nyud import NYUDDataset
from mtl.data.verify import main, verify

SIZE = (20, 24)
IDS = [f"n{i}" for i in range(8)]


def _messages(problems) -> dict[str, str]:
    """File name -> message (messages of one file joined by ' | ')."""
    found: dict[str, str] = {}
    for p in problems:
        name = p.path if " or " in p.path else Path(p.path).name
        found[name] = f"{found[name]} | {p.message}" if name in found else p.message
    return found


@pytest.fixture
def atrc(tmp_path: Path) -> Path:
    root = tmp_path / "nyud"
    write_nyud(root, {"train": IDS[:6], "val": IDS[6:]}, "atrc", SIZE)
    return root


def test_a_sound_folder_passes_and_split_sizes_are_checked(atrc: Path, capsys) -> None:
    assert main(["--dataset", "nyud", "--root", str(atrc), "--allow-subset"]) == 0
    assert "OK: NYUD-v2" in capsys.readouterr().out
    problems, checked = verify("nyud", atrc)
    assert checked == {"train": 6, "val": 2}
    assert [p.message for p in problems] == [
        "6 ids, the official release has 795",
        "2 ids, the official release has 654",
    ]


def test_each_planted_nyud_fault_is_reported_with_its_file(atrc: Path, capsys) -> None:
    (atrc / "depth" / "n0.npy").unlink()
    seg = np.asarray(Image.open(atrc / "segmentation" / "n1.png")).copy()
    seg[0, 0] = 41
    Image.fromarray(seg).save(atrc / "segmentation" / "n1.png")
    depth = np.load(atrc / "depth" / "n2.npy")
    depth[0, 0] = np.nan
    np.save(atrc / "depth" / "n2.npy", depth)
    np.save(atrc / "depth" / "n3.npy", -np.ones(SIZE, np.float32))
    normals = np.zeros((*SIZE, 3), np.float32)
    normals[..., 2] = 0.7  # valid but not unit length
    Image.fromarray(encode_normals(normals)).save(atrc / "normals" / "n4.png")
    Image.fromarray(np.full(SIZE, 7, np.uint8)).save(atrc / "edge" / "n5.png")
    Image.fromarray(np.zeros((SIZE[0] + 1, SIZE[1]), np.uint8)).save(atrc / "segmentation/n6.png")
    (atrc / "images" / "n7.png").write_bytes(b"not a png")
    (atrc / "gt_sets" / "val.txt").write_text("n6\nn7\nn7\nn5\n")

    status = main(["--dataset", "nyud", "--root", str(atrc), "--allow-subset"])
    report = capsys.readouterr().out
    assert status == 1
    found = _messages(verify("nyud", atrc, allow_subset=True)[0])
    assert found["n0.npy"] == "missing (depth of id 'n0')"
    assert found["n1.png"] == "segmentation label values [41] not allowed (allowed: 0..40, 255)"
    assert found["n2.npy"] == "1 non-finite depth values"
    assert found["n3.npy"].startswith(f"{SIZE[0] * SIZE[1]} negative depth values")
    assert "not unit length" in found["n4.png"]
    assert found["n5.png"].startswith("binary map values [7] not allowed (allowed: 0..1, 255)")
    taller = (SIZE[0] + 1, SIZE[1])
    assert found["n6.png"] == f"semseg has size {taller}, the image n6.png has {SIZE}"
    assert found["id 'n7'"].startswith("cannot decode image")
    assert found["val.txt"] == "ids listed more than once: ['n7'] | 1 ids also in train: ['n5']"
    for name in ("n0.npy", "n1.png", "n2.npy", "n3.npy", "n4.png", "n5.png", "n6.png"):
        assert name in report


def test_nyud_mt_float_normals_must_be_unit(tmp_path: Path) -> None:
    write_nyud(tmp_path, {"train": ["a"], "val": ["b"]}, "nyud_mt", SIZE)
    np.save(tmp_path / "normals" / "a.npy", np.full((*SIZE, 3), 0.5, np.float32))
    found = _messages(verify("nyud", tmp_path, allow_subset=True)[0])
    assert set(found) == {"a.npy"} and "not unit length" in found["a.npy"]


def test_pascal_faults(tmp_path: Path) -> None:
    root = tmp_path / "pascal"
    write_pascal(root, {"train": ["a", "b", "c"], "val": ["d"]}, SIZE, persons=["a"])
    mask = np.ones(SIZE, np.uint8)
    scipy.io.savemat(
        root / "human_parts" / "a.mat",
        part_annotation("a", [("person", 15, mask, {"tail": mask})]),
    )
    scipy.io.savemat(
        root / "pascal-context/trainval/b.mat", {"LabelMap": np.full(SIZE, 460, np.uint16)}
    )
    for folder in ("VOC12", "pascal-context"):
        (root / "semseg" / folder / "c.png").unlink(missing_ok=True)
    found = _messages(verify("pascal_context", root, allow_subset=True)[0])
    assert found["a.mat"] == "unknown person part 'tail'"
    assert found["b.mat"] == "LabelMap values [460] outside 0..459"
    semseg = str(root / "semseg" / "VOC12" / "c.png") + " or "
    assert [m for k, m in found.items() if k.startswith(semseg)] == ["missing (semseg of id 'c')"]
    assert len(found) == 3


def test_missing_root_exits_2_with_the_layout(tmp_path: Path, capsys) -> None:
    assert main(["--dataset", "pascal_context", "--root", str(tmp_path / "none")]) == 2
    message = capsys.readouterr().err
    assert "folder not found" in message and "JPEGImages" in message
    assert "datasets/README.md" in message


def test_datamodule_setup_fails_with_the_report(atrc: Path) -> None:
    (atrc / "edge" / "n3.png").unlink()
    datamodule = MultiTaskDataModule(
        dataset=partial(NYUDDataset, root=atrc),
        tasks=["semseg", "depth", "normals", "edge"],
        batch_size=2,
        check_files=100,
    )
    with pytest.raises(DatasetError) as info:
        datamodule.setup("fit")
    message = str(info.value)
    assert "'train' split" in message and "1 problem(s)" in message
    assert f"{atrc / 'edge' / 'n3.npy'} or {atrc / 'edge' / 'n3.png'}: missing" in message
    assert "python -m mtl.data.verify" in message
    missing = MultiTaskDataModule(
        dataset=partial(NYUDDataset, root=atrc / "missing"), tasks=["semseg"], batch_size=2
    )
    with pytest.raises(DatasetError, match="(?s)folder not found.*Expected layout"):
        missing.setup("fit")
