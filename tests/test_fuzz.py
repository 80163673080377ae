"""Randomly damaged files of every dataset format: the loader either returns the sample or
raises `DatasetError` naming the file, never another exception. Truncated and empty files always
raise; a damaged PNG (zlib and CRC checksums) never loads with changed content. JPEG entropy
data, .npy and uncompressed .mat payloads carry no checksum: a flipped bit there can change a
value without a trace, and is only caught when the value leaves its allowed range."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.data.base import DatasetError
from mtl.data.formats import write_nyud, write_pascal
from mtl.data.nyud import NYUDDataset
from mtl.data.pascal_context import PASCALContextDataset

SIZE = (20, 28)
CASES_PER_FILE = 12  # plus one truncation per file


def _damages(rng: np.random.Generator) -> list[tuple[str, Callable[[bytes], bytes]]]:
    """Named random corruptions of a file's bytes; the first is a truncation."""
    cut = float(rng.uniform(0.05, 0.98))

    def flip(data: bytes) -> bytes:
        array = bytearray(data)
        for i in rng.integers(0, len(array), size=int(rng.integers(1, 8))):
            array[i] ^= 1 << int(rng.integers(8))
        return bytes(array)

    def zero_block(data: bytes) -> bytes:
        start = int(rng.integers(0, len(data)))
        return data[:start] + bytes(min(64, len(data) - start)) + data[start + 64 :]

    def garbage(data: bytes) -> bytes:
        return rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()

    def header(data: bytes) -> bytes:
        array = bytearray(data)
        array[int(rng.integers(0, min(32, len(array))))] ^= 0xFF
        return bytes(array)

    def empty(data: bytes) -> bytes:
        return b""

    others = [("flip", flip), ("zero_block", zero_block), ("garbage", garbage),
              ("header", header), ("empty", empty)]  # fmt: skip
    picks = rng.choice(len(others), size=CASES_PER_FILE)
    return [("truncate", lambda data: data[: int(len(data) * cut)])] + [others[i] for i in picks]


def _fuzz(dataset, index: int, files: list[Path], seed: int) -> dict[str, int]:
    """Damage each file in turn; check the outcome; restore it. Returns outcome counts."""
    rng = np.random.default_rng(seed)
    outcomes = {"raised": 0, "loaded": 0}
    pristine_sample = dataset[index]
    for path in files:
        pristine = path.read_bytes()
        for name, damage in _damages(rng):
            path.write_bytes(damage(pristine))
            try:
                dataset[index]
            except DatasetError as error:
                assert str(path) in str(error) or path.name in str(error), (name, path, error)
                outcomes["raised"] += 1
            else:
                assert name != "truncate", f"truncated {path} loaded silently"
                assert name != "empty", f"empty {path} loaded silently"
                if path.suffix == ".png":
                    assert _same(dataset[index], pristine_sample), f"{name} of {path} passed"
                outcomes["loaded"] += 1
            finally:
                path.write_bytes(pristine)
        dataset[index]  # restored: loads again
    return outcomes


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a if key != "meta")


@pytest.mark.parametrize("variant", ["nyud_mt", "atrc"])
def test_nyud_files_fuzzed(tmp_path, variant):
    write_nyud(tmp_path, {"train": ["s0", "s1"], "val": ["v"]}, variant, SIZE, seed=1)
    dataset = NYUDDataset(tmp_path, "train", ["semseg", "depth", "normals", "edge"])
    files = list(dataset.files("s1").values())
    assert {p.suffix for p in files} == ({".jpg", ".png", ".npy"} if variant == "nyud_mt"
                                         else {".png", ".npy"})  # fmt: skip
    outcomes = _fuzz(dataset, 1, files, seed={"nyud_mt": 3, "atrc": 4}[variant])
    assert outcomes["raised"] >= len(files) * 2  # at least the truncated and empty files


def test_pascal_files_fuzzed(tmp_path):
    root = tmp_path / "pascal"
    write_pascal(root, {"train": ["a", "b"], "val": ["c"]}, SIZE, seed=2, persons=["a"])
    tasks = ["semseg", "parts", "sal", "normals", "edge"]
    dataset = PASCALContextDataset(root, "train", tasks, cache_dir=tmp_path / "cache")
    files = list(dataset.files("a").values())
    assert {p.suffix for p in files} == {".jpg", ".png", ".mat"}
    outcomes = _fuzz(dataset, 0, files, seed=7)
    assert outcomes["raised"] >= len(files) * 2
