"""Prediction images for W&B and TensorBoard: every N validation epochs of a fit, the first
validation batch's inputs with each task's prediction next to its target, drawn by the kind of
map the task predicts (`mtl.tasks.KINDS`, pictures from `mtl.render`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from mtl.render import colourise, prediction_and_target
from mtl.steps import logging_step
from mtl.tasks import get_task, training_only

__all__ = ["PredictionImages", "class_labels", "colourise", "input_rgb", "segmentation_masks"]

#: Label value of ignored pixels (the registry's ``ignore_value`` of classification tasks).
IGNORE = 255


def input_rgb(image: Tensor) -> np.ndarray:
    """uint8 RGB [H,W,3] of a normalised input image [3,H,W], stretched to its own range."""
    x = image.float().cpu()
    x = (x - x.amin()) / (x.amax() - x.amin()).clamp_min(1e-12)
    return (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


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


def _image_loggers(trainer: L.Trainer) -> list[Logger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]


class PredictionImages(L.Callback):
    """Logs prediction images of the first validation batch of a fit to every W&B and
    TensorBoard logger, every `every_n_val_epochs` validation epochs (``val/images/<task>``),
    at most `max_images` images, on the step of that epoch's validation scores. Stand-alone
    evaluations (the final re-validation, ``train=false``) add no images.

    W&B: class maps are interactive masks over the input (prediction and ground truth, class
    names from `class_names`, 255 shown as "ignore"); other maps are prediction | target
    pictures with a colour bar, the colour scale in the caption. TensorBoard: the same
    prediction | target pictures (class maps in palette colours), the images of a task stacked.
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

    @staticmethod
    def _fitting(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._fitting(trainer):
            self._validations += 1

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            self._fitting(trainer)
            and trainer.is_global_zero
            and self._validations % self.every_n_val_epochs == 0
            and bool(_image_loggers(trainer))
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
        step = logging_step(trainer)
        for logger in _image_loggers(trainer):
            if isinstance(logger, WandbLogger):
                logger.log_metrics(self.images(outputs, batch), step=step)
            else:
                for tag, array in self.pictures(outputs, batch).items():
                    logger.experiment.add_image(tag, array, global_step=step, dataformats="HWC")

    def _tasks(self, preds: Mapping[str, Tensor], batch: Mapping[str, Any]) -> list[str]:
        return [task for task in preds if task in batch and not training_only(task)]

    @torch.no_grad()
    def images(self, preds: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, list]:
        """``{"val/images/<task>": [wandb.Image, ...]}`` for the first images of a batch."""
        import wandb

        count = min(self.max_images, batch["image"].shape[0])
        inputs = [input_rgb(batch["image"][i]) for i in range(count)]
        media: dict[str, list] = {}
        for task in self._tasks(preds, batch):
            pred, spec = preds[task], get_task(task)
            if spec.kind == "labels":
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
                pictures = [
                    prediction_and_target(task, pred[i], batch[task][i]) for i in range(count)
                ]
                media[f"val/images/{task}"] = [
                    wandb.Image(array, caption=caption) for array, caption in pictures
                ]
        media["val/images/input"] = [wandb.Image(x) for x in inputs]
        return media

    @torch.no_grad()
    def pictures(self, preds: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict:
        """``{"val/images/<task>": uint8 [N*H, W, 3]}``: the first images' prediction | target
        pictures stacked, and the inputs."""
        count = min(self.max_images, batch["image"].shape[0])
        out = {
            f"val/images/{task}": np.concatenate(
                [
                    prediction_and_target(task, preds[task][i], batch[task][i])[0]
                    for i in range(count)
                ]
            )
            for task in self._tasks(preds, batch)
        }
        out["val/images/input"] = np.concatenate(
            [input_rgb(batch["image"][i]) for i in range(count)]
        )
        return out
