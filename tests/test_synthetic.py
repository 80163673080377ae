"""Tests for the procedural synthetic-scene dataset."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data import synthetic
from mtl.data.synthetic import (
    CLASS_NAMES,
    DEPTH_EDGE_REL,
    WORLD_UP,
    ensure_generated,
    generate,
    render_scene,
    scene_rng,
)

SIZE = (48, 64)
N_TRAIN, N_VAL, SEED = 3, 2, 7
REPO_ROOT = Path(__file__).resolve().parents[1]
FLOOR = CLASS_NAMES.index("floor") + 1


@pytest.fixture(scope="module")
def scenes() -> list[dict[str, np.ndarray]]:
    return [render_scene(scene_rng(0, "val", i), SIZE) for i in range(10)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("first") / "synthetic", N_TRAIN, N_VAL, SIZE, SEED)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _back_project(depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = intrinsics
    v, u = np.mgrid[0 : depth.shape[0], 0 : depth.shape[1]]
    z = depth.astype(np.float64)
    return np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], axis=-1)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _neighbour_flags(pair_flag, image: np.ndarray) -> np.ndarray:
    """Pixels for which ``pair_flag(a, b)`` holds with at least one 4-neighbour."""
    out = np.zeros(image.shape[:2], dtype=bool)
    vertical = pair_flag(image[:-1], image[1:])
    horizontal = pair_flag(image[:, :-1], image[:, 1:])
    out[:-1] |= vertical
    out[1:] |= vertical
    out[:, :-1] |= horizontal
    out[:, 1:] |= horizontal
    return out


def _depth_jump(rel: float):
    def flag(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        valid = (a > 0) & (b > 0)
        return valid & (np.abs(a - b) > rel * np.minimum(a, b))

    return flag


def _class_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a != b


# ------------------------------------------------------------------------------- determinism


def test_generation_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", N_TRAIN, N_VAL, SIZE, SEED)
    assert _files(again) == _files(dataset)

    other = _files(generate(tmp_path / "other", N_TRAIN, N_VAL, SIZE, SEED + 1))
    reference = _files(dataset)
    images = [k for k in reference if k.startswith("images")]
    assert all(other[k] != reference[k] for k in images)


def test_scenes_do_not_depend_on_how_many_are_generated(dataset: Path, tmp_path: Path) -> None:
    small = generate(tmp_path / "small", 1, 1, SIZE, SEED)
    for name in ("images/train_00000.png", "depth/val_00000.npy", "normals/train_00000.npy"):
        assert (small / name).read_bytes() == (dataset / name).read_bytes()


# ---------------------------------------------------------------------------------- geometry


def test_floor_normals_point_up_and_floor_lies_at_zero(scenes) -> None:
    for s in scenes:
        floor = s["semseg"] == FLOOR
        assert floor.sum() > 0.1 * floor.size
        up = s["normals"][floor].astype(np.float64) @ s["cam_to_world"].T
        assert _angle_deg(up, np.array(WORLD_UP)).max() < 1.0

        points = _back_project(s["depth"], s["intrinsics"])
        world = points @ s["cam_to_world"].T + s["cam_position"]
        assert np.abs(world[floor & (s["depth"] > 0), 2]).max() < 1e-3


def test_normals_are_unit_and_face_the_camera(scenes) -> None:
    for s in scenes:
        n = s["normals"].astype(np.float64)
        np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
        rays = _back_project(np.ones(SIZE), s["intrinsics"])
        assert (np.sum(n * rays, axis=-1) < 0).all()


def test_depth_and_normals_agree_on_smooth_regions(scenes) -> None:
    errors = []
    for s in scenes:
        p = _back_project(s["depth"], s["intrinsics"])
        du = p[1:-1, 2:] - p[1:-1, :-2]
        dv = p[2:, 1:-1] - p[:-2, 1:-1]
        estimated = -np.cross(du, dv)  # du x dv points away from the camera

        seg, depth, edge = s["semseg"], s["depth"], s["edge"]
        centre = seg[1:-1, 1:-1]
        smooth = np.ones(centre.shape, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                window = (slice(dy, dy + centre.shape[0]), slice(dx, dx + centre.shape[1]))
                smooth &= (seg[window] == centre) & (depth[window] > 0) & (edge[window] == 0)
        assert smooth.mean() > 0.4
        errors.append(_angle_deg(estimated[smooth], s["normals"][1:-1, 1:-1][smooth]))
    errors = np.concatenate(errors)
    assert np.median(errors) < 2.0
    assert np.percentile(errors, 75) < 5.0


def test_depth_is_metric_with_few_invalid_pixels(scenes) -> None:
    invalid = [float((s["depth"] == 0).mean()) for s in scenes]
    assert 0.002 < np.mean(invalid) < 0.06
    for s in scenes:
        valid = s["depth"][s["depth"] > 0]
        assert valid.min() > 0.3 and valid.max() < 20.0


# ------------------------------------------------------------------------------------ labels


def test_edges_lie_on_label_or_depth_discontinuities(scenes) -> None:
    depth_only_edges = 0
    for s in scenes:
        edge = s["edge"].astype(bool)
        class_change = _neighbour_flags(_class_change, s["semseg"])
        depth_jump = _neighbour_flags(_depth_jump(0.9 * DEPTH_EDGE_REL), s["depth"])
        near_hole = _neighbour_flags(lambda a, b: (a == 0) | (b == 0), s["depth"])
        explained = class_change | depth_jump
        assert not (edge & ~(explained | near_hole)).any()
        assert (edge & explained).sum() >= 0.9 * edge.sum()
        assert not (class_change & ~edge).any()  # semantic boundaries are edges
        assert 0.01 < edge.mean() < 0.25
        depth_only_edges += int((edge & ~class_change).sum())

        # Large depth jumps are occlusions, and thus edges, even within one class.
        large_jump = _neighbour_flags(_depth_jump(0.3), s["depth"])
        assert not (large_jump & ~edge).any()
    assert depth_only_edges > 0


def test_saliency_marks_objects_and_classes_are_plausible(scenes) -> None:
    present = set()
    object_fraction = []
    for s in scenes:
        assert s["semseg"].min() >= 1 and s["semseg"].max() <= len(CLASS_NAMES)
        np.testing.assert_array_equal(s["saliency"], (s["semseg"] >= 3).astype(np.uint8))
        present |= set(np.unique(s["semseg"]).tolist())
        object_fraction.append(s["saliency"].mean())
    assert present == set(range(1, len(CLASS_NAMES) + 1))
    assert 0.1 < np.mean(object_fraction) < 0.45


def test_image_varies_and_is_not_label_colour(scenes) -> None:
    for s in scenes:
        image = s["image"].astype(np.float64)
        assert image.std() > 10
        for label in np.unique(s["semseg"]):
            assert image[s["semseg"] == label].std(axis=0).max() > 1.0  # shading and noise


# ----------------------------------------------------------------------------------- on disk


def test_files_follow_the_nyud_layout(dataset: Path) -> None:
    h, w = SIZE
    train = (dataset / "gt_sets" / "train.txt").read_text().split()
    val = (dataset / "gt_sets" / "val.txt").read_text().split()
    assert len(train) == N_TRAIN and len(val) == N_VAL and not set(train) & set(val)
    for sample_id in train + val:
        image = np.asarray(Image.open(dataset / "images" / f"{sample_id}.png"))
        seg = np.asarray(Image.open(dataset / "segmentation" / f"{sample_id}.png"))
        depth = np.load(dataset / "depth" / f"{sample_id}.npy")
        normals = np.load(dataset / "normals" / f"{sample_id}.npy")
        edge = np.asarray(Image.open(dataset / "edge" / f"{sample_id}.png"))
        sal = np.asarray(Image.open(dataset / "saliency" / f"{sample_id}.png"))
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
        assert seg.dtype == np.uint8 and seg.shape == (h, w)
        assert set(np.unique(seg)) <= set(range(len(CLASS_NAMES) + 1))
        assert depth.dtype == np.float32 and depth.shape == (h, w) and (depth >= 0).all()
        assert normals.dtype == np.float32 and normals.shape == (h, w, 3)
        assert np.abs(normals).max() <= 1.0
        for mask in (edge, sal):
            assert mask.dtype == np.uint8 and mask.shape == (h, w)
            assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(sal == 255, seg >= 3)

    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["image_size"] == [h, w] and meta["seed"] == SEED
    assert (meta["n_train"], meta["n_val"]) == (N_TRAIN, N_VAL)
    assert set(meta["intrinsics"]) == {"fx", "fy", "cx", "cy"}
    assert isinstance(meta["format_version"], int)
    leftovers = [p.name for p in dataset.parent.iterdir() if p != dataset]
    assert leftovers == []


def test_ensure_generated_reuses_a_matching_set(dataset: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("should not regenerate")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert ensure_generated(dataset, N_TRAIN, N_VAL, SIZE, SEED) == dataset


def test_ensure_generated_refuses_other_parameters(dataset: Path) -> None:
    with pytest.raises(ValueError) as info:
        ensure_generated(dataset, N_TRAIN + 1, N_VAL, SIZE, SEED)
    message = str(info.value)
    assert str(dataset) in message
    assert f"'n_train': {N_TRAIN}" in message and f"'n_train': {N_TRAIN + 1}" in message


def test_ensure_generated_generates_when_missing(tmp_path: Path, caplog) -> None:
    root = tmp_path / "missing"
    with caplog.at_level(logging.INFO, logger=synthetic.__name__):
        assert ensure_generated(root, 1, 1, SIZE, SEED) == root
    assert (root / "meta.json").is_file()
    assert any(str(root) in r.getMessage() for r in caplog.records)
    assert len(list((root / "images").iterdir())) == 2


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def render_then_fail(rng, size):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return render_scene(rng, size)

    monkeypatch.setattr(synthetic, "render_scene", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "out", 2, 1, SIZE, SEED)
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="out"):
        generate(tmp_path / "out", 1, 0, SIZE, SEED)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_cli_matches_the_python_api(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "mtl.data.synthetic",
        "--out",
        str(out),
        "--n-train",
        "2",
        "--n-val",
        "1",
        "--size",
        str(SIZE[0]),
        str(SIZE[1]),
        "--seed",
        "5",
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, timeout=60)
    assert _files(out) == _files(generate(tmp_path / "api", 2, 1, SIZE, 5))
