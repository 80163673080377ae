"""W&B prediction images: every N validation epochs, the first validation batch's inputs with
segmentation masks (named classes, ignored pixels as class "ignore") and colourised dense
predictions next to their targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from mtl.tasks import get_task

#: Label value of ignored pixels (the registry's ``ignore_value`` of classification tasks).
IGNORE = 255

# Viridis at 5 stops, interpolated linearly: a perceptually ordered map without matplotlib.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def colourise(values: np.ndarray, low: float, high: float, valid: np.ndarray | None = None):
    """uint8 RGB [H,W,3] of a scalar map through viridis; invalid pixels black."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(_VIRIDIS) - 1)
    index = np.minimum(scaled.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (scaled - index)[..., None]
    rgb = _VIRIDIS[index] * (1 - frac) + _VIRIDIS[index + 1] * frac
    if valid is not None:
        rgb[~valid] = 0
    return rgb.astype(np.uint8)


def normals_rgb(normals: np.ndarray) -> np.ndarray:
    """uint8 RGB [H,W,3] of unit normals [3,H,W] as (n + 1) / 2; invalid (zero) vectors grey."""
    return ((np.moveaxis(normals, 0, -1) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def input_rgb(image: Tensor) -> np.ndarray:
    """uint8 RGB [H,W,3] of a normalised input image [3,H,W], stretched to its own range."""
    x = image.float().cpu()
    x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-12)
    return (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def task_panels(task: str, pred: Tensor, target: Tensor) -> np.ndarray:
    """Prediction and target side by side (uint8 RGB) for a dense, non-classification task."""
    decoded = get_task(task).decode(pred[None].float())[0].cpu().numpy()
    target = target.float().cpu().numpy()
    if task == "normals":
        return np.concatenate([normals_rgb(decoded), normals_rgb(target)], axis=1)
    decoded, target = decoded.reshape(decoded.shape[-2:]), target.reshape(target.shape[-2:])
    if task == "depth":
        valid = target > 0
        high = float(target[valid].max()) if valid.any() else float(decoded.max())
        return np.concatenate(
            [colourise(decoded, 0, high), colourise(target, 0, high, valid)], axis=1
        )
    valid = target != IGNORE  # edge, saliency: probabilities against {0, 1}
    return np.concatenate([colourise(decoded, 0, 1), colourise(target, 0, 1, valid)], axis=1)


def class_labels(task: str, num_classes: int, names: Sequence[str] | None) -> dict[int, str]:
    """``{index: name}`` for W&B masks, with the ignore label as its own class."""
    labels = {
        i: (names[i] if names and i < len(names) else f"{task} {i}") for i in range(num_classes)
    }
    labels[IGNORE] = "ignore"
    return labels


def segmentation_masks(pred: Tensor, target: Tensor, labels: dict[int, str]) -> dict:
    """W&B ``masks`` of one image: predicted and ground-truth class maps (uint8, 255 ignore)."""
    return {
        name: {"mask_data": m.cpu().numpy().astype(np.uint8), "class_labels": labels}
        for name, m in (("prediction", pred), ("ground_truth", target))
    }


class WandbPredictionImages(L.Callback):
    """Logs prediction images of the first validation batch to every `WandbLogger`, every
    `every_n_val_epochs` validation epochs (``val/images/<task>``), at most `max_images` images.

    Classification tasks (``semseg``, ``parts``) are W&B masks over the input (prediction and
    ground truth, class names from `class_names`, 255 shown as "ignore"); depth, normals, edges
    and saliency are colourised prediction | target pairs (depth: viridis on [0, max target];
    normals: (n + 1) / 2 as RGB; edge, saliency: probabilities). Per-class IoU tables reach W&B
    through `mtl.metrics.callback.MetricsCallback`.
    """

    def __init__(
        self,
        every_n_val_epochs: int = 1,
        max_images: int = 4,
        class_names: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if every_n_val_epochs < 1 or max_images < 1:
            raise ValueError(
                "wandb_media: every_n_val_epochs and max_images must be >= 1, got "
                f"{every_n_val_epochs} and {max_images}"
            )
        self.every_n_val_epochs = every_n_val_epochs
        self.max_images = max_images
        self.class_names = dict(class_names or {})
        self._validations = 0

    def _loggers(self, trainer: L.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validations += 1

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            not trainer.sanity_checking
            and trainer.is_global_zero
            and self._validations % self.every_n_val_epochs == 0
            and bool(self._loggers(trainer))
        )

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or not isinstance(outputs, Mapping) or not self._due(trainer):
            return
        media = self.images(outputs, batch)
        for logger in self._loggers(trainer):
            logger.log_metrics(media, step=trainer.global_step)

    @torch.no_grad()
    def images(self, preds: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, list]:
        """``{"val/images/<task>": [wandb.Image, ...]}`` for the first images of a batch."""
        import wandb

        count = min(self.max_images, batch["image"].shape[0])
        inputs = [input_rgb(batch["image"][i]) for i in range(count)]
        media: dict[str, list] = {}
        for task, pred in preds.items():
            if task not in batch:
                continue
            spec = get_task(task)
            if spec.classification:
                labels = class_labels(task, pred.shape[1], self.class_names.get(task))
                media[f"val/images/{task}"] = [
                    wandb.Image(
                        inputs[i],
                        masks=segmentation_masks(
                            spec.decode(pred[i : i + 1])[0], batch[task][i], labels
                        ),
                    )
                    for i in range(count)
                ]
            else:
                media[f"val/images/{task}"] = [
                    wandb.Image(
                        task_panels(task, pred[i], batch[task][i]),
                        caption="prediction | target",
                    )
                    for i in range(count)
                ]
        media["val/images/input"] = [wandb.Image(x) for x in inputs]
        return media
