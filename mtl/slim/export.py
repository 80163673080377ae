"""A pruned checkpoint: the dense sub-network of one width configuration of a slimmable run.

The checkpoint keeps everything of the original (balancer state, epoch, step) except the
optimiser and scheduler states (of the full model's shapes); its stored config gets
``model.slim.fixed`` = the widths, so `mtl.load`, ``eval.py`` and ``predict.py`` rebuild the
small model from it, and its signature counts the small model's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from mtl.checkpoint import (
    CONFIG_KEY,
    SIGNATURE_KEY,
    CheckpointError,
    atomic_save,
    model_signature,
)
from mtl.slim.cost import count_flops
from mtl.slim.widths import export_dense

#: State-dict prefix of the model inside a `MultiTaskModule` checkpoint.
MODEL_PREFIX = "model."


@dataclass
class Exported:
    """What `export_checkpoint` wrote: the file, and the exported model's counted size (as
    the loader rebuilds it from the written config)."""

    path: Path
    parameters: int
    full_parameters: int
    flops: int


def slim_node(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The ``model.slim`` node of a checkpoint of a slimmable run (else `CheckpointError`)."""
    stored = checkpoint.get(CONFIG_KEY) or {}
    node = (stored.get("model") or {}).get("slim") or {}
    if not node.get("_target_"):
        raise CheckpointError(
            f"ckpt_path: {path} was not trained with model/slim=on; only a slimmable model "
            "runs at other widths"
        )
    if node.get("fixed"):
        raise CheckpointError(
            f"ckpt_path: {path} is already an exported sub-network (model.slim.fixed = "
            f"{node['fixed']}); give the checkpoint of the slimmable run"
        )
    return dict(node)


def export_checkpoint(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    widths: Mapping[str, float],
    output: str | Path,
    image_size: Sequence[int],
) -> Exported:
    """Write the dense sub-network of `widths` of `model` (the slimmable model of
    `checkpoint`, changed in place) to `output`. The exported model is rebuilt from the
    written config as the loader does, checked to take the weights, and counted."""
    from mtl.api import stored_config  # mtl.api builds models through mtl.train
    from mtl.train import build_model

    output = Path(output)
    full_parameters = sum(p.numel() for p in model.parameters())
    export_dense(model, widths)
    config = copy.deepcopy(checkpoint[CONFIG_KEY])
    config["model"]["slim"]["fixed"] = {k: float(v) for k, v in widths.items()}
    exported = dict(checkpoint)
    exported[CONFIG_KEY] = config
    rebuilt = build_model(stored_config(exported, output)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(state)  # strict: the loader's model takes these weights as they are
    parameters = sum(p.numel() for p in rebuilt.parameters())
    with torch.no_grad():
        flops = count_flops(lambda: rebuilt(torch.zeros(1, 3, *image_size)))
    exported["state_dict"] = {
        **{k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(MODEL_PREFIX)},
        **{MODEL_PREFIX + k: v for k, v in state.items()},
    }
    for key in ("optimizer_states", "lr_schedulers"):  # of the full model's shapes
        exported.pop(key, None)
    exported[SIGNATURE_KEY] = model_signature(OmegaConf.create(config), parameters)
    atomic_save(exported, output)
    return Exported(output, parameters, full_parameters, flops)
