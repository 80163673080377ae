"""Writers of the official on-disk formats, for tests and benchmarks.

``write_nyud`` writes the NYUD-v2 layout in either release (``"nyud_mt"``: .jpg images, .npy
normals and edges; ``"atrc"``: .png everywhere but depth); ``write_pascal`` writes the PASCAL_MT
layout with PASCAL-Part ``.mat`` structs and 459-class Context label maps. Contents are random
but structured like real data (smooth photos with texture, label regions, unit normals, depth
with holes), and every raw array written is returned so callers can compare decoded values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

NYUD_SIZES = {"nyud_mt": (480, 640), "atrc": (425, 560)}
PASCAL_SIZE = (375, 500)
_PART_DTYPE = [("part_name", object), ("mask", object)]
_OBJECT_DTYPE = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
_PERSON_PARTS = ("head", "hair", "torso", "neck", "luarm", "rlarm", "rhand", "luleg", "rlleg")


# --------------------------------------------------------------------------- content


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour fields, a few shapes, sensor noise."""
    low = rng.uniform(0, 255, (max(2, height // 40), max(2, width // 40), 3)).astype(np.float32)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.circle(image, centre, int(rng.integers(5, max(6, height // 4))), colour, -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def regions(rng: np.random.Generator, height: int, width: int, labels: Sequence[int]) -> np.ndarray:
    """A uint16 map of blocky regions whose values are drawn from ``labels``."""
    coarse = rng.choice(np.asarray(labels), (max(2, height // 60), max(2, width // 60)))
    return cv2.resize(coarse.astype(np.uint16), (width, height), interpolation=cv2.INTER_NEAREST)


def unit_normals(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth float32 HxWx3 unit normals facing the camera (z < 0 is never produced)."""
    low = rng.normal(0, 0.5, (max(2, height // 50), max(2, width // 50), 3)).astype(np.float32)
    normals = cv2.resize(low, (width, height), interpolation=cv2.INTER_LINEAR)
    normals[..., 2] = np.abs(normals[..., 2]) + 0.5
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals -> uint8 RGB ``round((n + 1) * 255 / 2)``; zero vectors -> 128 grey."""
    return np.clip(np.rint((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """uint8 {0, 1}: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=np.uint8)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1] |= labels[:-1] != labels[1:]
    return edge


def _save_png(path: Path, array: np.ndarray) -> None:
    """Lossless PNG of an HxW or HxWx3 (RGB) uint8 array."""
    Image.fromarray(array).save(path)


def _write_splits(path: Path, splits: Mapping[str, Sequence[str]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (path / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


# --------------------------------------------------------------------------- NYUD-v2


def write_nyud(
    root: str | Path,
    splits: Mapping[str, Sequence[str]],
    variant: str = "atrc",
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Write a NYUD-v2 folder; returns ``{id: {"image", "semseg", "depth", "normals", "edge"}}``
    holding the raw arrays written (semseg 0..40 with 0 = unlabeled, normals as float)."""
    if variant not in NYUD_SIZES:
        raise ValueError(f"variant must be one of {sorted(NYUD_SIZES)}, got {variant!r}")
    root = Path(root)
    height, width = size or NYUD_SIZES[variant]
    for folder in ("images", "segmentation", "depth", "normals", "edge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    _write_splits(root / "gt_sets", splits)
    rng = np.random.default_rng(seed)
    written = {}
    for sample_id in dict.fromkeys(i for ids in splits.values() for i in ids):
        image = photo(rng, height, width)
        semseg = regions(rng, height, width, range(41)).astype(np.uint8)
        depth = rng.uniform(0.5, 10.0, (height, width)).astype(np.float32)
        depth[regions(rng, height, width, (0, 0, 0, 1)) == 1] = 0.0  # Kinect holes
        normals = unit_normals(rng, height, width)
        normals[depth == 0] = 0.0
        edge = boundaries(semseg)
        _save_png(root / "segmentation" / f"{sample_id}.png", semseg)
        np.save(root / "depth" / f"{sample_id}.npy", depth)
        if variant == "nyud_mt":
            cv2.imwrite(str(root / "images" / f"{sample_id}.jpg"), image[..., ::-1])
            np.save(root / "normals" / f"{sample_id}.npy", normals)
            np.save(root / "edge" / f"{sample_id}.npy", edge.astype(np.float32))
        else:
            _save_png(root / "images" / f"{sample_id}.png", image)
            _save_png(root / "normals" / f"{sample_id}.png", encode_normals(normals))
            _save_png(root / "edge" / f"{sample_id}.png", edge * 255)
        written[sample_id] = {
            "image": image,
            "semseg": semseg,
            "depth": depth,
            "normals": normals,
            "edge": edge,
        }
    return written


# --------------------------------------------------------------------------- PASCAL_MT


def part_annotation(
    image_name: str, objects: Sequence[tuple[str, int, np.ndarray, Mapping[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    """The ``anno`` struct of a PASCAL-Part ``.mat`` file.

    ``objects``: (class name, class index, uint8 mask, {part name: uint8 mask}) per object.
    """
    table = np.zeros((1, len(objects)), dtype=_OBJECT_DTYPE)
    for i, (name, index, mask, parts) in enumerate(objects):
        part_table = np.zeros((1, len(parts)) if parts else (0, 0), dtype=_PART_DTYPE)
        for j, (part_name, part_mask) in enumerate(parts.items()):
            part_table[0, j] = (part_name, part_mask.astype(np.uint8))
        table[0, i] = (name, np.array([[index]], dtype=np.uint8), mask.astype(np.uint8), part_table)
    anno = np.zeros((1, 1), dtype=[("imname", object), ("objects", object)])
    anno[0, 0] = (image_name, table)
    return {"anno": anno}


def _person(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, dict]:
    """A person mask and part masks stacked top to bottom inside it."""
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    h, w = height // 2, width // 4
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top : top + h, left : left + w] = 1
    parts = {}
    step = max(1, h // len(_PERSON_PARTS))
    for k, name in enumerate(_PERSON_PARTS):
        part = np.zeros_like(mask)
        part[top + k * step : top + (k + 1) * step, left : left + w] = 1
        parts[name] = part
    return mask, parts


def write_pascal(
    root: str | Path,
    splits: Mapping[str, Sequence[str]],
    size: tuple[int, int] = PASCAL_SIZE,
    seed: int = 0,
    persons: Sequence[str] = (),
    voc_ids: Sequence[str] | None = None,
) -> dict[str, dict[str, object]]:
    """Write a PASCAL_MT folder (all tasks). Ids in ``persons`` get an annotated person; ids in
    ``voc_ids`` (default: every other id) get ``semseg/VOC12``, the rest ``semseg/pascal-context``.
    Returns per id the raw arrays written: image, semseg, sal, normals (uint8), context, and the
    part annotation objects."""
    root = Path(root)
    height, width = size
    folders = ("JPEGImages", "semseg/VOC12", "semseg/pascal-context", "human_parts",
               "sal_distill", "normals_distill", "pascal-context/trainval")  # fmt: skip
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    _write_splits(root / "ImageSets" / "Context", splits)
    ids = list(dict.fromkeys(i for split_ids in splits.values() for i in split_ids))
    voc = set(ids[::2] if voc_ids is None else voc_ids)
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, object]] = {}
    for sample_id in ids:
        image = photo(rng, height, width)
        semseg = regions(rng, height, width, [*range(21), 255]).astype(np.uint8)
        context = regions(rng, height, width, (158, 440, 68, 360, 284, 187, 397))
        sal = (regions(rng, height, width, (0, 1)) * 255).astype(np.uint8)
        normals = encode_normals(unit_normals(rng, height, width))
        objects = []
        if sample_id in persons:
            mask, parts = _person(rng, height, width)
            objects.append(("person", 15, mask, parts))
        car = np.zeros((height, width), dtype=np.uint8)
        car[-height // 4 :, -width // 4 :] = 1
        objects.append(("car", 7, car, {"frontside": car}))
        cv2.imwrite(str(root / "JPEGImages" / f"{sample_id}.jpg"), image[..., ::-1])
        folder = "VOC12" if sample_id in voc else "pascal-context"
        _save_png(root / "semseg" / folder / f"{sample_id}.png", semseg)
        _save_png(root / "sal_distill" / f"{sample_id}.png", sal)
        _save_png(root / "normals_distill" / f"{sample_id}.png", normals)
        scipy.io.savemat(
            root / "human_parts" / f"{sample_id}.mat", part_annotation(sample_id, objects)
        )
        scipy.io.savemat(
            root / "pascal-context" / "trainval" / f"{sample_id}.mat", {"LabelMap": context}
        )
        written[sample_id] = {
            "image": image,
            "semseg": semseg,
            "sal": sal,
            "normals": normals,
            "context": context,
            "objects": objects,
        }
    return written
