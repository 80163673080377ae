"""Load a trained model for use in Python: ``mtl.load("<run>/checkpoints/last.ckpt")``.

The model is rebuilt from the config stored in the checkpoint (``mtl_config``, see
`mtl.checkpoint`), so no training override has to be repeated; the weights are loaded with
``weights_only=True``. `LoadedModel` holds the model in eval mode with everything needed to use
it: its tasks, class names, the normalisation and the input size of its evaluation, and
``predict`` for one image of any size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from mtl.checkpoint import CONFIG_KEY, CheckpointError, load_checkpoint
from mtl.data.transforms import IMAGE_PAD_VALUE, IMAGENET_MEAN, IMAGENET_STD, ToTensorNormalize
from mtl.models.multitask import MultiTaskModel
from mtl.tasks import get_task

#: State-dict prefix of the model inside a `MultiTaskModule` checkpoint.
MODEL_PREFIX = "model."
#: State-dict prefix of the auxiliary heads of training-only tasks inside the model.
AUX_PREFIX = "aux_heads."


@dataclass
class LoadedModel:
    """A trained model in eval mode and what using it needs.

    Attributes:
        model: the `MultiTaskModel` (``model(images, tasks)`` -> raw outputs per task).
        tasks: the tasks it predicts.
        class_names: class names per classification task (empty where none are configured).
        num_classes: class count per classification task.
        input_size: (height, width) the model was evaluated at: images are padded to it (or
            resized down to fit, then padded); None keeps each image's size.
        protocol: "pad" or "resize", as the evaluation transform of its data config.
        mean, std: the image normalisation (per RGB channel, images in [0, 1]).
        config: the stored config of the training run.
        epoch, step: where in training the checkpoint was written.
    """

    model: MultiTaskModel
    tasks: list[str]
    class_names: dict[str, list[str]]
    num_classes: dict[str, int]
    input_size: tuple[int, int] | None
    protocol: str = "pad"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    config: DictConfig = field(default_factory=lambda: OmegaConf.create({}))
    epoch: int = -1
    step: int = -1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def transform(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """An RGB uint8 HxWx3 image as the model's normalised input [1,3,h,w], and the size
        (rows, columns) of the image inside it (the rest is padding)."""
        height, width = image.shape[:2]
        target = self.input_size
        if target is not None and self.protocol == "resize":
            image = cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_LINEAR)
            height, width = target
        elif target is not None:
            scale = min(1.0, target[0] / height, target[1] / width)  # only ever shrink
            if scale < 1:
                height = max(1, min(target[0], round(height * scale)))
                width = max(1, min(target[1], round(width * scale)))
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            image = cv2.copyMakeBorder(
                np.ascontiguousarray(image),
                0,
                target[0] - height,
                0,
                target[1] - width,
                cv2.BORDER_CONSTANT,
                value=IMAGE_PAD_VALUE,
            )
        tensor = ToTensorNormalize(self.mean, self.std)({"image": image})["image"]
        return tensor.unsqueeze(0).to(self.device), (height, width)

    @torch.no_grad()
    def predict(self, image: np.ndarray, tasks: list[str] | None = None) -> dict[str, Tensor]:
        """Each task's decoded prediction for one RGB uint8 HxWx3 image of any size, at that
        size, on the CPU: class indices [H,W] (int64) for classification tasks, otherwise
        [C,H,W] floats (depth in metres, unit normals, edge/saliency probabilities)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        inputs, (rows, columns) = self.transform(image)
        outputs = self.model(inputs, tasks or self.tasks)
        decoded = {}
        for task, raw in outputs.items():
            # crop the padding, then back to the original size; raw outputs (logits) are
            # interpolated before decoding, so class maps come from resized scores
            raw = raw[..., :rows, :columns].float()
            if (rows, columns) != (height, width):
                raw = F.interpolate(raw, (height, width), mode="bilinear", align_corners=False)
            decoded[task] = get_task(task).decode(raw)[0].cpu()
        return decoded


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def stored_config(checkpoint: Mapping[str, Any], path: str | Path) -> DictConfig:
    """The training run's config stored in `checkpoint` (read from `path`)."""
    stored = checkpoint.get(CONFIG_KEY)
    if not isinstance(stored, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds no stored config ({CONFIG_KEY}); only checkpoints "
            "written by train.py can be loaded this way"
        )
    cfg = OmegaConf.create(dict(stored))
    with open_dict(cfg):
        cfg.model.compile = False  # inference: eager
        if "pretrained_file" in cfg.model.backbone:
            cfg.model.backbone.pretrained_file = None  # the checkpoint brings the weights
        cfg.model.init_from = None
    return cfg


def _input_size(cfg: DictConfig) -> tuple[tuple[int, int] | None, str]:
    """The evaluation input size and protocol of the data config: the size of its evaluation
    transform, else ``data.image_size`` (the training crop)."""
    transform = cfg.data.get("val_transform") or {}
    size = transform.get("size") or cfg.data.get("image_size")
    protocol = transform.get("protocol") or "pad"
    if size is None:
        return None, protocol
    size = list(size) if not isinstance(size, int) else [size, size]
    return (int(size[0]), int(size[1])), str(protocol)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint written by ``train.py``, in eval mode on `map_location`.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: the file is damaged, or holds no stored config.
    """
    from mtl.train import build_model  # the model builder of training (heavy imports)

    checkpoint = load_checkpoint(path, map_location="cpu")
    cfg = stored_config(checkpoint, path)
    # training-only tasks are not predicted: their auxiliary heads stay in the checkpoint (for
    # resuming) and are neither built nor loaded
    model = build_model(cfg, aux_heads=False)
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX) and not key.startswith(MODEL_PREFIX + AUX_PREFIX)
    }
    model.load_state_dict(state)
    model.to(map_location).eval()
    size, protocol = _input_size(cfg)
    return LoadedModel(
        model=model,
        tasks=list(model.tasks),
        class_names={k: list(v) for k, v in _plain(cfg.data.get("class_names")).items()},
        num_classes={k: int(v) for k, v in _plain(cfg.data.get("num_classes")).items()},
        input_size=size,
        protocol=protocol,
        config=cfg,
        epoch=int(checkpoint.get("epoch", -1)),
        step=int(checkpoint.get("global_step", -1)),
    )


def load_module(path: str | Path, map_location: str | torch.device | None = None) -> Any:
    """The whole `MultiTaskModule` (model, balancer state, metrics) of a checkpoint written by
    ``train.py``, rebuilt from its stored config, in eval mode: what
    ``MultiTaskModule.load_from_checkpoint`` returns."""
    from mtl.train import build_module

    checkpoint = load_checkpoint(path, map_location="cpu")
    cfg = stored_config(checkpoint, path)
    with open_dict(cfg):
        cfg.delta_m_baselines = None  # a baselines file of the training machine may be gone
    module = build_module(cfg)
    module.load_state_dict(checkpoint["state_dict"])
    if map_location is not None:
        module.to(map_location)
    return module.eval()
