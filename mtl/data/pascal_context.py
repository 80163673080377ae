"""PASCAL-Context multi-task dataset (semseg, human parts, saliency, normals, edges).

The PASCAL_MT layout of the multi-task benchmark (Maninis et al. 2019, used by MTI-Net, ATRC,
InvPT, M3ViT, MTLoRA)::

    <root>/JPEGImages/<id>.jpg                    RGB image (about 375x500)
    <root>/ImageSets/Context/{train,val}.txt      one id per line (4998 / 5105)
    <root>/semseg/VOC12/<id>.png                  21 classes (0 = background), 255 = void ...
    <root>/semseg/pascal-context/<id>.png         ... used when the VOC12 file does not exist
    <root>/human_parts/<id>.mat                   PASCAL-Part annotation (struct ``anno``)
    <root>/sal_distill/<id>.png                   distilled saliency, 0..255
    <root>/normals_distill/<id>.png               distilled normals, uint8 RGB (2 * v / 255 - 1)
    <root>/pascal-context/trainval/<id>.mat       459-class Context label map ``LabelMap``
    <root>/ImageSets/Parts/{train,val}.txt        optional: per-image object classes (JSON)

Decoded: semseg as stored; parts mapped to 7 classes (background, head, torso, upper arm, lower
arm, upper leg, lower leg), every pixel 255 (ignore) for an image without an annotated person;
saliency ``v / 255 > 0.5``; normals zeroed (invalid) where the Context class is not one of the
NYU-compatible classes, then re-normalised; edges = thinned non-zero Laplacian of the Context
label map. Nothing is ever written under ``root``: the per-image object lists used to skip
person-free images are read from ``ImageSets/Parts`` when the release has them, else built once
and kept in ``cache_dir``. The checker (``mtl.data.verify``) runs the same readers as the loader.
A ``.mat`` file may inflate to a bounded number of bytes per pixel of its image (see
`CONTEXT_BYTES_PER_PIXEL`, `PARTS_BYTES_PER_PIXEL`); a larger one is refused unread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mtl.data.base import (
    DatasetError,
    MultiTaskDataset,
    Problem,
    Sample,
    problem_of,
    read_id_list,
)
from mtl.data.checks import allowed_values, require_size, require_unit, require_values
from mtl.data.edges import label_edges
from mtl.data.io import DecodeError, image_size, read_label_png, read_mat, read_rgb, read_rgb_png
from mtl.data.nyud import encoded_normal_lengths
from mtl.data.transforms import ENCODED_NORMAL_MIN_NORM, ENCODED_NORMAL_PAD_VALUE, IGNORE_INDEX

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
PART_CLASSES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
PERSON = VOC_CLASSES.index("person")  # PASCAL-Part ``class_ind`` of persons
NUM_CONTEXT_CLASSES = 459

#: PASCAL-Part person part name -> index into PART_CLASSES (the benchmark's 6-part grouping).
PART_OF = {
    **dict.fromkeys(
        ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1
    ),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}

#: Context classes with valid distilled normals: the classes whose name is also an NYUv2 class
#: name ("unknown" excepted), plus tvmonitor. Index in the 459-class LabelMap -> name.
NORMALS_VALID_CLASSES = {
    3: "air conditioner", 4: "antenna", 6: "ashtray", 9: "bag", 10: "ball", 11: "balloon",
    13: "barrel", 15: "basket", 17: "bathtub", 18: "bed", 22: "bench", 23: "bicycle",
    29: "blackboard", 30: "board", 33: "book", 34: "bottle", 36: "bowl", 37: "box",
    38: "bracelet", 39: "brick", 41: "broom", 43: "bucket", 46: "cabinet", 49: "cake",
    50: "calculator", 51: "calendar", 53: "camera", 55: "can", 56: "candle", 59: "car",
    61: "cart", 62: "case", 65: "cat", 66: "cd", 68: "ceiling", 69: "cell phone", 72: "chair",
    73: "chessboard", 78: "clock", 83: "coffee machine", 84: "comb", 85: "computer", 87: "cone",
    88: "container", 95: "corkscrew", 96: "counter", 101: "crate", 104: "cup", 105: "curtain",
    107: "cutting board", 111: "dishwasher", 113: "dog", 115: "door", 122: "drum", 124: "duck",
    135: "envelope", 141: "fan", 142: "faucet", 143: "fax machine", 146: "fire extinguisher",
    150: "fish tank", 154: "flag", 157: "flashlight", 158: "floor", 159: "flower", 165: "fork",
    172: "fruit", 174: "furnace", 181: "glass", 183: "globe", 184: "glove", 191: "guitar",
    193: "hammer", 195: "handle", 197: "hanger", 199: "hat", 202: "heater", 213: "ipod",
    215: "ironing board", 216: "jar", 219: "key", 220: "keyboard", 223: "knife", 225: "ladder",
    228: "laptop", 230: "lid", 232: "light", 233: "light bulb", 238: "lock", 239: "machine",
    242: "map", 243: "mask", 246: "mattress", 250: "microphone", 251: "microwave", 252: "mirror",
    255: "money", 260: "mouse", 261: "mouse pad", 263: "napkin", 269: "oven", 272: "pan",
    273: "paper", 275: "paper cutter", 281: "pen", 283: "pencil", 284: "person", 285: "photo",
    286: "piano", 287: "picture", 288: "pig", 290: "pillow", 291: "pipe", 292: "pitcher",
    293: "plant", 295: "plate", 304: "pool table", 307: "pot", 309: "printer", 310: "projector",
    314: "radiator", 315: "radio", 319: "range hood", 323: "remote control", 329: "rope",
    330: "rug", 331: "ruler", 336: "scale", 342: "sculpture", 345: "sewing machine",
    349: "shelves", 350: "shoe", 351: "shopping cart", 352: "shovel", 355: "sign", 357: "sink",
    368: "sofa", 370: "spatula", 371: "speaker", 374: "spoon", 379: "stapler", 380: "stick",
    383: "stool", 384: "stove", 397: "table", 401: "tape", 403: "telephone", 405: "tent",
    407: "toaster", 408: "toilet", 411: "toothbrush", 412: "towel", 413: "toy", 414: "toy car",
    417: "trampoline", 419: "tray", 421: "tricycle", 423: "trophy", 427: "tvmonitor",
    429: "typewriter", 430: "umbrella", 432: "vacuum cleaner", 440: "wall", 441: "wallet",
    442: "wardrobe", 443: "washing machine", 444: "watch", 446: "water dispenser",
    454: "window", 457: "wire",
}  # fmt: skip
_NORMALS_VALID_LUT = np.zeros(NUM_CONTEXT_CLASSES + 1, dtype=bool)
_NORMALS_VALID_LUT[list(NORMALS_VALID_CLASSES)] = True

_SEMSEG_ALLOWED = allowed_values((*range(len(VOC_CLASSES)), IGNORE_INDEX))

#: How far from unit length a distilled normal (a network output quantised to uint8) may be.
NORMAL_TOLERANCE = 0.1

#: Bytes a ``.mat`` file may inflate to per pixel of its image: a LabelMap holds one number per
#: pixel (at most 8 bytes); a PASCAL-Part file one uint8 mask per object and per part (the
#: busiest files of the release hold about 100). Plus `_MAT_HEADERS` for names and headers.
CONTEXT_BYTES_PER_PIXEL = 8
PARTS_BYTES_PER_PIXEL = 512
_MAT_HEADERS = 1 << 16


def _mat_budget(per_pixel: int, size: tuple[int, int] | None) -> int | None:
    """How many bytes a ``.mat`` file of an image of ``size`` may inflate to (None: unknown
    size, the reader's default cap)."""
    return None if size is None else per_pixel * int(size[0]) * int(size[1]) + _MAT_HEADERS

LAYOUT = """\
  <root>/JPEGImages/<id>.jpg
  <root>/ImageSets/Context/train.txt, val.txt   one id per line (4998 / 5105)
  <root>/semseg/VOC12/<id>.png or semseg/pascal-context/<id>.png   0..20, 255 = void
  <root>/human_parts/<id>.mat                   PASCAL-Part struct `anno`
  <root>/sal_distill/<id>.png
  <root>/normals_distill/<id>.png
  <root>/pascal-context/trainval/<id>.mat       `LabelMap`, 459 classes (edges, normals mask)"""


# --------------------------------------------------------------------------- decoders


def read_semseg(path: Path) -> np.ndarray:
    """21-class segmentation as uint8 HxW (255 = void); other values are a `DecodeError`."""
    return require_values(read_label_png(path), _SEMSEG_ALLOWED, path, "segmentation label")


def read_saliency(path: Path) -> np.ndarray:
    """Distilled saliency as uint8 {0, 1}: ``v / 255 > 0.5``."""
    return (read_label_png(path) > 127).astype(np.uint8)


def read_context_labels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The 459-class Context label map (``LabelMap``) as an integer HxW array; ``size``: its
    image's (H, W), which bounds how much the file may inflate."""
    labels = _label_map(path, size)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise DecodeError(
            f"{path}: expected an integer HxW LabelMap, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > NUM_CONTEXT_CLASSES):
        outside = np.unique(labels[(labels < 0) | (labels > NUM_CONTEXT_CLASSES)])[:8].tolist()
        raise DecodeError(f"{path}: LabelMap values {outside} outside 0..{NUM_CONTEXT_CLASSES}")
    return labels


def _label_map(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """The ``LabelMap`` variable of a Context ``.mat`` file, unchecked."""
    mat = read_mat(path, _mat_budget(CONTEXT_BYTES_PER_PIXEL, size))
    if "LabelMap" not in mat:
        raise DecodeError(f"no variable 'LabelMap' in {path}")
    return np.asarray(mat["LabelMap"])


def normals_valid(context_labels: np.ndarray) -> np.ndarray:
    """bool HxW: pixels whose Context class has valid distilled normals."""
    return _NORMALS_VALID_LUT[np.clip(context_labels, 0, NUM_CONTEXT_CLASSES)]


def read_normals(path: Path, context_labels: np.ndarray) -> np.ndarray:
    """Distilled normals in their uint8 HxWx3 encoding (``2 * v / 255 - 1``, decoded by
    ``ToTensorNormalize``), set to the invalid code where the Context class has no normals."""
    normals = read_rgb_png(path)
    if context_labels.shape != normals.shape[:2]:
        raise DecodeError(
            f"normals {normals.shape[:2]} and Context labels {context_labels.shape} differ: {path}"
        )
    valid = normals_valid(context_labels)
    norm = encoded_normal_lengths(normals)
    require_unit(norm, valid & (norm >= ENCODED_NORMAL_MIN_NORM), NORMAL_TOLERANCE, path)
    normals[~valid] = ENCODED_NORMAL_PAD_VALUE
    return normals


def _objects(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The ``anno.objects`` struct array of a PASCAL-Part file (possibly empty); ``size``: its
    image's (H, W), which bounds how much the file may inflate."""
    mat = read_mat(path, _mat_budget(PARTS_BYTES_PER_PIXEL, size))
    try:
        objects = mat["anno"][0, 0]["objects"]
    except (KeyError, IndexError, ValueError):
        raise DecodeError(f"not a PASCAL-Part annotation (no anno.objects): {path}") from None
    return objects.ravel()


def _malformed(path: Path, what: str) -> DecodeError:
    return DecodeError(f"{path}: malformed PASCAL-Part struct ({what})")


def _class_ind(obj: np.void, path: Path) -> int:
    values = np.asarray(obj["class_ind"]).ravel()
    if values.size != 1:
        raise _malformed(path, f"{'empty' if values.size == 0 else values.size} class_ind")
    return int(values[0])


def _struct_errors(path: Path, read: Callable[[], object]) -> object:
    """``read()``, a struct that lacks a field or has one of the wrong kind a `DecodeError`."""
    try:
        return read()
    except DecodeError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        raise _malformed(path, f"{type(error).__name__}: {error}") from None


def object_classes(path: Path, size: tuple[int, int] | None = None) -> list[int]:
    """``class_ind`` of every object of a PASCAL-Part file; -1 for objects with an empty mask.
    A file that cannot be read or whose struct is malformed is a `DecodeError` naming it."""
    objects = _objects(path, size)
    return _struct_errors(
        path, lambda: [_class_ind(obj, path) if obj["mask"].any() else -1 for obj in objects]
    )


def read_parts(
    path: Path, objects: np.ndarray | None = None, size: tuple[int, int] | None = None
) -> np.ndarray | None:
    """7-class human-part map (uint8 HxW) of a PASCAL-Part file; None without annotated persons.

    Every part of every person is painted in file order (later objects win); pixels outside
    all parts are background (0). ``objects``: the file's objects, when already read; ``size``:
    the image's (H, W), which every object mask must have. A file whose struct is malformed is
    a `DecodeError`.
    """
    objects = _objects(path, size) if objects is None else objects
    return _struct_errors(path, lambda: _paint_parts(path, objects, size))


def _paint_parts(
    path: Path, objects: np.ndarray, size: tuple[int, int] | None
) -> np.ndarray | None:
    target = None
    for obj in objects:
        if size is not None:
            require_size(obj["mask"].shape, size, path, "object mask")
        parts = obj["parts"].ravel()
        if _class_ind(obj, path) != PERSON or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(obj["mask"].shape, dtype=np.uint8)
        for part in parts:
            name = str(part["part_name"].ravel()[0])
            if name not in PART_OF:
                raise DecodeError(f"{path}: unknown person part {name!r}")
            mask = part["mask"]
            if mask.shape != target.shape:
                raise DecodeError(f"{path}: part mask {mask.shape} differs from {target.shape}")
            target[mask.astype(bool)] = PART_OF[name]
    return target


# --------------------------------------------------------------------------- object lists


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.replace(tmp, path)


def object_lists(
    root: Path, split: str, ids: Sequence[str], cache_dir: Path | None, skip_bad: bool = False
) -> dict[str, list[int]]:
    """Object classes of every id's PASCAL-Part file.

    Read from the release's ``ImageSets/Parts/<split>.txt`` when it covers ``ids``, else from
    ``cache_dir`` (keyed by the root and the ids), else built from the ``.mat`` files and, with
    a ``cache_dir``, stored there. Never written under ``root``. A file that cannot be read is
    a `DecodeError` naming it; with ``skip_bad`` its id is left out with a warning instead (the
    loader then reads the file, and skips the sample), and the lists are not cached.
    """
    shipped = root / "ImageSets" / "Parts" / f"{split}.txt"
    if shipped.is_file():
        lists = _read_lists(shipped)
        if lists is None:
            raise DecodeError(f"{shipped}: expected a JSON object of id -> class indices")
        if all(i in lists for i in ids):
            return lists
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1("\n".join([str(root.resolve()), *ids]).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"pascal_parts_{split}_{key}.json"
        if cache.is_file() and (lists := _read_lists(cache)) is not None:
            return lists  # an unreadable cache is rebuilt
    log.info("Listing PASCAL-Part objects of %d images (done once per split)", len(ids))
    lists: dict[str, list[int]] = {}
    for i in ids:
        try:
            lists[i] = object_classes(root / "human_parts" / f"{i}.mat", _jpeg_size(root, i))
        except DecodeError as error:
            if not skip_bad:
                raise
            log.warning("%s; id %r left out of the object lists (data.skip_bad=true)", error, i)
    if cache is not None and len(lists) == len(set(ids)):
        _atomic_write(cache, json.dumps(lists))
    return lists


def _read_lists(path: Path) -> dict[str, list[int]] | None:
    """Object lists stored as JSON; None when the file does not hold them."""
    try:
        lists = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return lists if isinstance(lists, dict) else None


def _jpeg_size(root: Path, sample_id: str) -> tuple[int, int] | None:
    """(H, W) of an id's image from its header; None when it cannot be read (reported when
    the sample is loaded)."""
    try:
        return image_size(root / "JPEGImages" / f"{sample_id}.jpg")
    except Exception:  # a missing or damaged image: the loader names it
        return None


# --------------------------------------------------------------------------- dataset


class PASCALContextDataset(MultiTaskDataset):
    """PASCAL-Context multi-task (PASCAL_MT layout) as framework samples.

    Args:
        root, split, tasks, transform: as for every dataset.
        cache_dir: where derived per-image object lists are kept (never under ``root``);
            None keeps them in memory only.
        edge_eval_list: file listing the ids whose edges are scored (the literature uses the
            2498-image ``test_new`` subset of val); relative paths are taken from ``root``.
            None scores every id. The ids are in ``edge_eval_ids``.
        list_objects: list each image's PASCAL-Part objects up front, so that person-free
            images skip their part file; False reads every part file (the checker does).
        skip_bad: a part file that cannot be listed is left out of the lists with a warning
            (the sample is then skipped when loaded, see ``data.skip_bad``) instead of stopping.
        check_ids: see `MultiTaskDataset.read_split`.
    """

    NAME = "PASCAL-Context"
    LAYOUT = LAYOUT
    SPLIT_SIZES = {"train": 4998, "val": 5105}

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable[[Sample], Sample] | None = None,
        cache_dir: str | Path | None = None,
        edge_eval_list: str | Path | None = None,
        list_objects: bool = True,
        skip_bad: bool = False,
        check_ids: bool = True,
    ) -> None:
        super().__init__(root, split, tasks, transform, check_ids)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.edge_eval_ids = self._edge_eval_ids(edge_eval_list)
        self._has_person: dict[str, bool] | None = None
        if "parts" in self.tasks and list_objects:
            try:
                lists = object_lists(self.root, split, self.ids, self.cache_dir, skip_bad)
            except DecodeError as error:
                raise DatasetError(f"{self.NAME} '{split}' object lists: {error}") from error
            self._has_person = {i: PERSON in lists[i] for i in self.ids if i in lists}

    def _edge_eval_ids(self, edge_eval_list: str | Path | None) -> list[str]:
        if edge_eval_list is None:
            return list(self.ids)
        path = Path(edge_eval_list)
        path = path if path.is_absolute() else self.root / path
        if not path.is_file():
            raise self.layout_error(f"edge evaluation list not found: {path}")
        listed = set(read_id_list(path))
        return [i for i in self.ids if i in listed]

    @classmethod
    def available_tasks(cls, root: str | Path) -> list[str]:
        root = Path(root)
        context = (root / "pascal-context" / "trainval").is_dir()
        present = {
            "semseg": (root / "semseg" / "VOC12").is_dir()
            or (root / "semseg" / "pascal-context").is_dir(),
            "parts": (root / "human_parts").is_dir(),
            "sal": (root / "sal_distill").is_dir(),
            "normals": (root / "normals_distill").is_dir() and context,
            "edge": context,
        }
        return [task for task, found in present.items() if found]

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        return root / "ImageSets" / "Context" / f"{split}.txt"

    def required_folders(self) -> list[Path]:
        return [self.root / "JPEGImages"]

    def _semseg_file(self, sample_id: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{sample_id}.png"
        return (
            voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{sample_id}.png"
        )

    def files(self, sample_id: str) -> dict[str, Path]:
        root = self.root
        files = {"image": root / "JPEGImages" / f"{sample_id}.jpg"}
        if "semseg" in self.tasks:
            files["semseg"] = self._semseg_file(sample_id)
        if "parts" in self.tasks:
            files["parts"] = root / "human_parts" / f"{sample_id}.mat"
        if "sal" in self.tasks:
            files["sal"] = root / "sal_distill" / f"{sample_id}.png"
        if "normals" in self.tasks:
            files["normals"] = root / "normals_distill" / f"{sample_id}.png"
        if "normals" in self.tasks or "edge" in self.tasks:
            files["context"] = root / "pascal-context" / "trainval" / f"{sample_id}.mat"
        return files

    def _has_annotated_person(self, sample_id: str) -> bool:
        return self._has_person is None or self._has_person.get(sample_id, True)

    def load_sample(self, index: int) -> Sample:
        sample_id = self.ids[index]
        files = self.files(sample_id)
        for role, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(f"missing {role} file for id {sample_id!r}: {path}")
        image = read_rgb(files["image"])
        size = image.shape[:2]
        sample: Sample = {"image": image}
        context = None
        if "context" in files:
            context = read_context_labels(files["context"], size)
            require_size(context.shape, size, files["context"], "LabelMap", files["image"].name)
        for task in self.tasks:
            if task == "parts" and not self._has_annotated_person(sample_id):
                sample[task] = np.full(size, IGNORE_INDEX, np.uint8)
            elif task == "edge":
                sample[task] = label_edges(context)
            else:
                sample[task] = self._read(task, files[task], size, context)
                if sample[task] is None:  # a part file without annotated persons
                    sample[task] = np.full(size, IGNORE_INDEX, np.uint8)
                require_size(sample[task].shape, size, files[task], task, files["image"].name)
        sample["meta"] = self.meta(sample_id, size)
        return sample

    @staticmethod
    def _read(
        task: str, path: Path, size: tuple[int, int], context: np.ndarray | None
    ) -> np.ndarray | None:
        """The decoded map of ``task`` (not edge, which comes from ``context``)."""
        if task == "semseg":
            return read_semseg(path)
        if task == "parts":
            return read_parts(path, size=size)
        if task == "sal":
            return read_saliency(path)
        return read_normals(path, context)

    def missing_files(self, sample_id: str) -> list[Problem]:
        problems = super().missing_files(sample_id)
        voc = self.root / "semseg" / "VOC12" / f"{sample_id}.png"
        return [
            Problem(f"{voc} or {p.path}", p.message)
            if p.message.startswith("missing (semseg")
            else p
            for p in problems
        ]

    def sample_problems(self, sample_id: str) -> list[Problem]:
        """What the loader would refuse in each file of the sample (its readers, its rules);
        every part file is read, as if it had an annotated person."""
        missing = self.missing_files(sample_id)
        if missing:
            return missing
        files = self.files(sample_id)
        size = read_rgb(files["image"]).shape[:2]
        problems: list[Problem] = []
        context = None
        if "context" in files:
            try:
                context = read_context_labels(files["context"], size)
                require_size(context.shape, size, files["context"], "LabelMap", files["image"].name)
            except DecodeError as error:
                problems.append(problem_of(files["context"], error))
                context = None
        for task in self.tasks:
            if task == "edge" or (task == "normals" and context is None):
                continue  # from the Context labels, reported above
            try:
                decoded = self._read(task, files[task], size, context)
                if decoded is not None:
                    require_size(decoded.shape, size, files[task], task, files["image"].name)
            except DecodeError as error:
                problems.append(problem_of(files[task], error))
        return problems
