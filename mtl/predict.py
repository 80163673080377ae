"""Predictions of a trained model on ordinary images (the body of ``predict.py``).

``python predict.py ckpt_path=PATH input=DIR_OR_GLOB [output=DIR]`` runs the checkpoint's model
(`mtl.load`) on every image of a folder or glob, at each image's own size, and writes::

    <task>/<name>.png      a picture drawn by the task's kind (`mtl.render`): classes coloured
                           (PASCAL VOC palette), normals as RGB ((n + 1) / 2), depth (0 to its
                           maximum) and edge/saliency probabilities (0 to 1) through viridis
    <task>/<name>.npy      the raw prediction: class indices (uint8, HxW), depth in metres
                           (float32, HxW), unit normals (float32, HxWx3), probabilities
                           (float32, HxW)
    overview/<name>.png    the image and every task side by side, with titles (matplotlib)
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mtl import render
from mtl.api import LoadedModel
from mtl.tasks import get_task

log = logging.getLogger(__name__)

#: File suffixes taken from a folder (a glob takes whatever it matches).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class PredictError(ValueError):
    """Bad input to ``predict.py``: no images, an unreadable image; the message says which."""


def find_images(pattern: str) -> list[Path]:
    """The images of a folder (files with an `IMAGE_SUFFIXES` suffix, sorted) or of a glob
    pattern (``**`` recurses), sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        what = "no image files in the folder" if path.is_dir() else "no files match"
        raise PredictError(
            f"input: {what} '{pattern}'; give a folder of images or a glob such as "
            "input='photos/*.jpg'"
        )
    return sorted(files)


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 HxWx3 (EXIF orientation applied)."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise PredictError(f"input: cannot read image {path}: {error}") from None


def check_images(paths: Sequence[Path]) -> None:
    """Raise `PredictError` naming the first file that is not a readable image, before any
    prediction is written (PIL's ``verify`` reads the file without decoding it)."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise PredictError(f"input: cannot read image {path}: {error}") from None


def output_names(paths: Sequence[Path]) -> list[str]:
    """A file name per image: its stem, made unique with ``_2``, ``_3`` ... when two images of
    different folders share one."""
    names, seen = [], {}
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return names


def raw_array(task: str, prediction: torch.Tensor) -> np.ndarray:
    """A decoded prediction (`LoadedModel.predict`) as the array saved to ``.npy``."""
    if get_task(task).classification:
        return prediction.numpy().astype(np.uint8 if int(prediction.max()) < 256 else np.int64)
    array = prediction.float().numpy()
    return array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))


def picture(task: str, prediction: torch.Tensor) -> np.ndarray:
    """A decoded prediction as an HxWx3 uint8 picture, drawn by the task's kind in the registry
    (`mtl.render`): classes in palette colours, vectors as RGB, other maps through viridis from
    0 (or their minimum) to their maximum."""
    values = prediction.detach().float().cpu().numpy().reshape(-1, *prediction.shape[-2:])
    return render.picture(task, values, render.colour_range(task, values, None), is_target=False)


def class_legend(prediction: torch.Tensor, names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The named classes present in a class map, each with its colour in `picture`."""
    present = [int(i) for i in np.unique(prediction.numpy()) if 0 <= i < len(names)]
    colours = render.class_colours(np.array(present, dtype=np.int64))
    return [(names[i], colour) for i, colour in zip(present, colours, strict=True)]


def save_overview(
    path: Path, image: np.ndarray, predictions: dict[str, torch.Tensor], loaded: LoadedModel
) -> None:
    """The image and every task's picture in one figure (a colour bar for scalar maps)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = len(predictions) + 1
    height, width = image.shape[:2]
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2 * height / width + 0.6))
    axes[0].imshow(image)
    axes[0].set_title("input")
    for ax, (task, prediction) in zip(axes[1:], predictions.items(), strict=True):
        spec = get_task(task)
        scalar = not spec.classification and prediction.shape[0] == 1
        if scalar and spec.decode is not torch.sigmoid:
            shown = ax.imshow(prediction[0].numpy(), cmap="viridis", vmin=0)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        else:
            ax.imshow(picture(task, prediction))
        names = loaded.class_names.get(task)
        if spec.classification and names:
            entries = class_legend(prediction, names)
            handles = [Patch(color=colour / 255, label=name) for name, colour in entries]
            ax.legend(
                handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                ncol=min(len(handles), 3), fontsize=7, frameon=False, handlelength=1,
            )  # fmt: skip
        ax.set_title(task)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predict_files(
    loaded: LoadedModel, images: str | Sequence[Path], output: str | Path
) -> list[Path]:
    """Predict every image of `images` (a folder, a glob or a list of files) and write the
    files of the module docstring under `output`; returns the images."""
    paths = find_images(images) if isinstance(images, str) else list(images)
    check_images(paths)
    output = Path(output)
    for folder in (*loaded.tasks, "overview"):
        (output / folder).mkdir(parents=True, exist_ok=True)
    for path, name in zip(paths, output_names(paths), strict=True):
        image = read_image(path)
        predictions = loaded.predict(image)
        for task, prediction in predictions.items():
            Image.fromarray(picture(task, prediction)).save(output / task / f"{name}.png")
            np.save(output / task / f"{name}.npy", raw_array(task, prediction))
        save_overview(output / "overview" / f"{name}.png", image, predictions, loaded)
        log.info("%s -> %s/*/%s.png", path, output, name)
    log.info("%d images predicted: %s", len(paths), output)
    return paths
