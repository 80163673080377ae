"""``predict.py``: a trained model on ordinary images of any size, written as pictures, arrays
and overviews."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import mtl
from mtl import render
from mtl.config import ConfigError
from mtl.predict import PredictError, check_images, find_images, output_names, read_image

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "edge", "sal"]


def predict(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python predict.py ARGS`` run from `cwd`, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A larger-than-trained RGB JPEG, a small greyscale PNG and a text file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(folder / "big.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(folder / "small.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_writes_pictures_arrays_and_an_overview_per_image(trained_run, photos, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    result = predict(f"ckpt_path={checkpoint}", f"input={photos}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "outputs" / "predict").iterdir())  # the default: a new run folder
    assert len(runs) == 1
    out = runs[0]

    loaded = mtl.load(checkpoint)
    for name, size in (("big", (100, 150)), ("small", (30, 20))):
        expected = loaded.predict(read_image(next(photos.glob(f"{name}.*"))))
        for task in TASKS:
            picture = np.asarray(Image.open(out / task / f"{name}.png"))
            assert picture.shape == (*size, 3) and picture.dtype == np.uint8, (name, task)
            array = np.load(out / task / f"{name}.npy")
            want = expected[task].numpy()  # [H,W], [1,H,W] or [3,H,W]
            if want.ndim == 3:
                want = want[0] if len(want) == 1 else np.moveaxis(want, 0, -1)
            assert array.shape == want.shape, (name, task)
            assert np.allclose(array, want, atol=1e-5), (name, task)
        semseg = np.load(out / "semseg" / f"{name}.npy")
        assert semseg.dtype == np.uint8 and semseg.max() < 5
        assert np.allclose(np.linalg.norm(np.load(out / "normals" / f"{name}.npy"), axis=2), 1)
        # probabilities through the shared colour scale on [0, 1] (as in W&B and exports)
        sal = np.load(out / "sal" / f"{name}.npy")
        drawn = np.asarray(Image.open(out / "sal" / f"{name}.png")).astype(int)
        assert np.abs(drawn - render.colourise(sal, 0.0, 1.0)).max() <= 1
        # one class, one colour: the picture's colours follow the class map
        colours = np.asarray(Image.open(out / "semseg" / f"{name}.png")).reshape(-1, 3)
        pairs = {(int(c), tuple(rgb)) for c, rgb in zip(semseg.reshape(-1), colours, strict=True)}
        assert len(pairs) == len(np.unique(semseg))
        overview = Image.open(out / "overview" / f"{name}.png")
        assert overview.width > overview.height
    assert not list(out.glob("*/notes.*"))


def test_the_overview_legend_gives_each_present_class_its_picture_colour():
    from mtl.predict import class_legend, picture

    labels = torch.tensor([[[0, 0, 3], [3, 4, 4]]])  # classes 0, 3, 4 of five; [1,H,W]
    names = ["floor", "wall", "sphere", "box", "cylinder"]
    drawn = picture("semseg", labels)
    entries = class_legend(labels, names)
    assert [name for name, _ in entries] == ["floor", "box", "cylinder"]
    for (name, colour), row, col in zip(entries, (0, 0, 1), (0, 2, 1), strict=True):
        assert tuple(colour) == tuple(drawn[row, col]), name
    assert len({tuple(c) for _, c in entries}) == 3


def test_predict_takes_a_glob_and_an_output_folder(trained_run, photos, tmp_path):
    out = tmp_path / "mine"
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    result = predict(
        f"ckpt_path={checkpoint}", f"input={photos}/*.png", f"output={out}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in (out / "depth").iterdir()) == ["small.npy", "small.png"]
    assert [p.name for p in (out / "overview").iterdir()] == ["small.png"]


def test_no_matching_image_is_one_error_line(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    result = predict(f"ckpt_path={checkpoint}", f"input={tmp_path}/*.jpg", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: input: no files match '{tmp_path}/*.jpg'; give a folder of images or a glob "
        "such as input='photos/*.jpg'"
    ]


def test_bad_input_is_named(photos, tmp_path):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(PredictError, match=f"input: cannot read image {photos / 'broken.png'}"):
        check_images(find_images(str(photos)))
    (photos / "broken.png").unlink()
    with pytest.raises(PredictError, match=f"input: cannot read image {photos / 'notes.txt'}"):
        check_images(find_images(f"{photos}/*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PredictError, match="input: no image files in the folder"):
        find_images(str(empty))


def test_images_of_the_same_name_get_distinct_outputs():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("b/y.png"), Path("c/x.jpg")]
    assert output_names(paths) == ["x", "x_2", "y", "x_3"]


def test_predictions_need_a_checkpoint_and_input(tmp_path):
    result = predict("input=photos", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: ckpt_path: missing; python predict.py ckpt_path=" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_a_cuda_device_without_cuda_is_named():
    spec = importlib.util.spec_from_file_location("predict_entry", ROOT / "predict.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    cfg = OmegaConf.create({"ckpt_path": "x.ckpt", "input": "photos", "device": "cuda"})
    with pytest.raises(ConfigError, match="device: 'cuda', but PyTorch sees no CUDA device"):
        entry.run(cfg)
