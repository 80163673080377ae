"""The file decoders return what Pillow returns, whichever library decodes the file (libspng
where pyspng is installed, OpenCV otherwise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data import io
from mtl.data.io import DecodeError, read_label_png, read_rgb, read_rgb_png

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True, params=["libspng", "opencv"])
def decoder(request, monkeypatch):
    """Every test once with each PNG decoder."""
    if request.param == "libspng":
        pytest.importorskip("pyspng")
    else:
        monkeypatch.setattr(io, "_pyspng", None)
    return request.param


def _grey8(path: Path) -> None:
    Image.fromarray(RNG.integers(0, 41, (13, 17), dtype=np.uint8)).save(path)


def _grey16(path: Path) -> None:
    Image.fromarray(RNG.integers(0, 60000, (13, 17)).astype(np.uint16)).save(path)


def _one_bit(path: Path) -> None:
    Image.fromarray(RNG.integers(0, 2, (13, 17)).astype(bool)).convert("1").save(path)


def _palette(path: Path) -> None:
    image = Image.fromarray(RNG.integers(0, 21, (13, 17), dtype=np.uint8)).convert("P")
    image.putpalette([(7 * i) % 256 for i in range(768)])
    image.save(path)


def _rgb_mask(path: Path) -> None:
    grey = RNG.integers(0, 2, (13, 17), dtype=np.uint8) * 255
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(path)


@pytest.mark.parametrize("write", [_grey8, _grey16, _one_bit, _palette, _rgb_mask])
def test_label_pngs_decode_to_pillows_raw_values(tmp_path, write):
    path = tmp_path / "label.png"
    write(path)
    expected = np.array(Image.open(path))
    expected = expected[..., 0] if expected.ndim == 3 else expected
    got = read_label_png(path)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_a_cut_grey_label_png_is_refused_naming_it(tmp_path):
    path = tmp_path / "label.png"
    _grey8(path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DecodeError) as info:
        read_label_png(path)
    assert str(path) in str(info.value) and "truncated PNG" in str(info.value)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_maps_decode_to_pillows_rgb_values(tmp_path, mode):
    path = tmp_path / "normals.png"
    pixels = RNG.integers(0, 256, (13, 17, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    got = read_rgb_png(path)
    assert got.dtype == np.uint8 and np.array_equal(got, pixels[..., :3])


@pytest.mark.parametrize("write", [_grey8, _grey16])
def test_an_rgb_map_that_is_not_8_bit_rgb_is_refused_naming_it(tmp_path, write):
    path = tmp_path / "normals.png"
    write(path)
    with pytest.raises(DecodeError) as info:
        read_rgb_png(path)
    assert str(path) in str(info.value) and "expected an 8-bit RGB PNG" in str(info.value)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_png_images_decode_to_pillows_rgb_values(tmp_path, mode):
    path = tmp_path / "image.png"
    shape = (13, 17) if mode == "L" else (13, 17, len(mode))
    Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    expected = np.array(Image.open(path).convert("RGB"))
    got = read_rgb(path)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_a_cut_png_image_is_refused_naming_it(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DecodeError) as info:
        read_rgb(path)
    assert str(path) in str(info.value) and "truncated PNG" in str(info.value)
