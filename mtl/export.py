"""Prediction export: per-task files at original size and side-by-side images for people.

Layout under ``out_dir`` (the file layout of the MTI-Net/ATRC evaluation code and of SEISM)::

    <task>/<id>.png        by the task's kind in the registry (`mtl.tasks.KINDS`):
                           labels (semseg, parts): uint8 class index (0-based, as predicted)
                           scalar (depth): uint16 millimetres (or <id>.npy float32 metres)
                           vector (normals): uint8 RGB, decoded as 2v/255 - 1
                           probability (sal, edge): uint8, probability x 255 (truncated)
                           raw: <id>.npy float32 of the decoded prediction
    ids.txt                the evaluated ids in order (SEISM's gt_sets/<set>.txt); only the
                           listed ones when the dataset scores a task on a list
                           (``data.edge_eval_list``)
    seism_parameters.txt   the edge thresholds, one per line (SEISM's parameters/<method>.txt)
    visual/<id>.png        one row per task: input | ground truth | prediction

For the SEISM benchmark copy ``edge/`` to ``seism/datasets/<database>/<method>/``,
``seism_parameters.txt`` to ``seism/parameters/<method>.txt`` and ``ids.txt`` to the database's
``gt_sets/`` folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, ImageDraw
from torch import Tensor

from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_to_original
from mtl.metrics.boundary import threshold_set, to_uint8
from mtl.metrics.subsets import evaluation_dataset, scored_ids
from mtl.render import as_map, colour_range, decoded
from mtl.render import picture as render_picture
from mtl.tasks import get_task, training_only

# --------------------------------------------------------------------------- file encodings


def encode_prediction(task: str, pred: Tensor, depth_format: str = "png16") -> np.ndarray:
    """One raw prediction [C,H,W] as the array written to disk (see the module docstring)."""
    kind = get_task(task).kind
    values = decoded(task, pred)
    if kind == "labels":
        return values[0].astype(np.uint8)
    if kind == "scalar":
        if depth_format == "npy":
            return values[0]
        return np.clip(np.round(values[0] * 1000), 0, 65535).astype(np.uint16)
    if kind == "vector":
        return np.clip(np.round((np.moveaxis(values, 0, -1) + 1) * 255 / 2), 0, 255).astype(
            np.uint8
        )
    if kind == "probability":
        return to_uint8(values[0])
    return values  # raw: float32, saved as .npy


def save_array(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as PNG (uint8/uint16) or .npy (anything else); returns the path."""
    if array.dtype in (np.uint8, np.uint16):
        path = path.with_suffix(".png")
        Image.fromarray(array).save(path)
    else:
        path = path.with_suffix(".npy")
        np.save(path, array)
    return path


# --------------------------------------------------------------------------- colours


def denormalise(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """[3,H,W] image normalised by `mean` and `std` (``data.mean``/``data.std``) -> HxWx3
    uint8."""
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def side_by_side(image: np.ndarray, rows: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> Image:
    """A panel with one row per task: input | ground truth | prediction, with labels."""
    height, width = image.shape[:2]
    gap, label_width, header = 4, 64, 16
    panel = Image.new(
        "RGB",
        (label_width + 3 * width + 2 * gap, header + len(rows) * (height + gap)),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(panel)
    for column, title in enumerate(("input", "ground truth", "prediction")):
        draw.text((label_width + column * (width + gap) + 2, 2), title, fill=(0, 0, 0))
    for row, (task, target, prediction) in enumerate(rows):
        top = header + row * (height + gap)
        draw.text((2, top + 2), task, fill=(0, 0, 0))
        for column, picture in enumerate((image, target, prediction)):
            panel.paste(Image.fromarray(picture), (label_width + column * (width + gap), top))
    return panel


# --------------------------------------------------------------------------- callback


class PredictionWriter(L.Callback):
    """Writes the predictions of a stand-alone evaluation (``trainer.validate``/``test``, not the
    validation epochs of a fit) at original size, cropping ``meta["pad"]`` away.

    Args:
        out_dir: folder of the export (see the module docstring for the layout).
        depth_format: "png16" (uint16 millimetres) or "npy" (float32 metres).
        max_visuals: side-by-side pictures to write (the first images; 0: none, -1: all).
        edge_thresholds: threshold set written to ``seism_parameters.txt`` (99, "hed" or a list).
        mean, std: the input normalisation (``data.mean``/``data.std``), undone for pictures.
    """

    def __init__(
        self,
        out_dir: str | Path,
        depth_format: str = "png16",
        max_visuals: int = 16,
        edge_thresholds: int | str | Sequence[float] = 99,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if depth_format not in ("png16", "npy"):
            raise ValueError(f"depth_format '{depth_format}': expected 'png16' or 'npy'")
        self.out_dir = Path(out_dir)
        self.depth_format = depth_format
        self.max_visuals = max_visuals
        self.edge_thresholds = edge_thresholds
        self.mean, self.std = tuple(mean), tuple(std)
        self.ids: list[str] = []
        self.tasks: set[str] = set()
        self.dataset: Any | None = None

    @staticmethod
    def _evaluating(trainer: L.Trainer) -> bool:
        return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)

    def _start(self, trainer: L.Trainer) -> None:
        self.ids, self.tasks = [], set()
        self.dataset = evaluation_dataset(trainer)  # for its evaluation lists, if any

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start(trainer)

    def on_test_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start(trainer)

    def on_validation_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if self._evaluating(trainer):
            self.write_batch(outputs, batch)

    def on_test_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        self.write_batch(outputs, batch)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._evaluating(trainer):
            self.write_lists(trainer.global_rank, trainer.world_size)

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write_lists(trainer.global_rank, trainer.world_size)

    def write_batch(self, preds: Mapping[str, Tensor], batch: Mapping[str, Any]) -> None:
        """Write every task's prediction (and a few pictures) of one batch."""
        meta = batch.get("meta") or {}
        ids = [str(i) for i in meta.get("id", [])]
        if len(ids) != batch["image"].shape[0]:
            raise ValueError("prediction export needs batch['meta']['id'] for every image")
        pad = meta.get("pad", (0, 0, 0, 0))
        images = crop_to_original(batch["image"], pad)
        preds = {task: pred for task, pred in preds.items() if not training_only(task)}
        cropped = {task: crop_to_original(pred, pad) for task, pred in preds.items()}
        targets = {task: crop_to_original(batch[task], pad) for task in preds if task in batch}
        self.tasks.update(cropped)
        for index, sample_id in enumerate(ids):
            for task, pred in cropped.items():
                folder = self.out_dir / task
                folder.mkdir(parents=True, exist_ok=True)
                array = encode_prediction(task, pred[index], self.depth_format)
                save_array(folder / sample_id, array)
            if self.max_visuals < 0 or len(self.ids) < self.max_visuals:
                self._write_visual(sample_id, images[index], cropped, targets, index)
            self.ids.append(sample_id)

    def _write_visual(
        self,
        sample_id: str,
        image: Tensor,
        preds: Mapping[str, Sequence[Tensor]],
        targets: Mapping[str, Sequence[Tensor]],
        index: int,
    ) -> None:
        rows = []
        for task, pred in preds.items():
            target = as_map(targets[task][index]) if task in targets else None
            values = decoded(task, pred[index])
            scale = colour_range(task, values, target)
            picture = render_picture(task, values, scale, is_target=False)
            truth = (
                render_picture(task, target, scale, is_target=True)
                if target is not None
                else np.zeros_like(picture)
            )
            label = task
            if get_task(task).kind in ("scalar", "probability", "raw"):
                label += f"\n{scale[0]:.3g}-\n{scale[1]:.3g}"  # the colour scale
            rows.append((label, truth, picture))
        folder = self.out_dir / "visual"
        folder.mkdir(parents=True, exist_ok=True)
        picture = side_by_side(denormalise(image, self.mean, self.std), rows)
        picture.save(folder / f"{sample_id}.png")

    def write_lists(self, rank: int = 0, world_size: int = 1) -> None:
        """Write the evaluated ids and the edge thresholds (SEISM's id list and parameters)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if world_size == 1 else f"_rank{rank}"
        listed = [scored_ids(self.dataset, task) for task in sorted(self.tasks)]
        ids = [i for i in self.ids if all(i in subset for subset in listed if subset is not None)]
        (self.out_dir / f"ids{suffix}.txt").write_text("".join(f"{i}\n" for i in ids))
        thresholds = threshold_set(self.edge_thresholds)
        (self.out_dir / "seism_parameters.txt").write_text("".join(f"{t:g}\n" for t in thresholds))
