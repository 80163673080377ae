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
from mtl.slim.widths import ENCODER, export_dense


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
    tasks: Sequence[str] | None = None,
) -> Exported:
    """Write the dense sub-network of `widths` of `model` (the slimmable model of
    `checkpoint`, changed in place) to `output`, with the heads of `tasks` only (None: all).
    The exported module is rebuilt from the written config as the loaders do, checked to take
    the weights, and counted."""
    from mtl.api import stored_config  # mtl.api builds modules through mtl.train
    from mtl.train import build_module

    output = Path(output)
    tasks = list(model.tasks) if tasks is None else list(tasks)
    full_parameters = sum(p.numel() for p in model.parameters())
    export_dense(model, widths)
    model.decoders = nn.ModuleDict({t: model.decoders[t] for t in tasks})
    model.tasks = tasks
    config = copy.deepcopy(checkpoint[CONFIG_KEY])
    config["data"]["tasks"] = tasks
    config["model"]["slim"]["fixed"] = {
        k: float(v) for k, v in widths.items() if k == ENCODER or k in tasks
    }
    exported = dict(checkpoint)
    exported[CONFIG_KEY] = config
    cfg = stored_config(exported, output)
    cfg.delta_m_baselines = None  # a baselines file of the training machine may be gone
    module = build_module(cfg).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    module.model.load_state_dict(state)  # strict: the rebuilt model takes these weights
    parameters = sum(p.numel() for p in module.model.parameters())
    with torch.no_grad():
        flops = count_flops(lambda: module.model(torch.zeros(1, 3, *image_size)))
    # the rest of the module (balancer state) as trained where it still fits, else as built
    original = checkpoint["state_dict"]
    exported["state_dict"] = {
        key: original[key]
        if key in original and original[key].shape == value.shape and not key.startswith("model.")
        else value
        for key, value in module.state_dict().items()
    }
    for key in ("optimizer_states", "lr_schedulers"):  # of the full model's shapes
        exported.pop(key, None)
    exported[SIGNATURE_KEY] = model_signature(OmegaConf.create(config), parameters)
    atomic_save(exported, output)
    return Exported(output, parameters, full_parameters, flops)

