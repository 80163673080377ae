"""What is merged: single-task checkpoints in, one multi-task checkpoint out.

Only the shared encoder's parameters are merged. Each task's decoder comes unchanged from its
own checkpoint; BatchNorm running statistics and counters are never merged arithmetically
(the caller recomputes them on training images, or they are averaged here); other buffers are
copied from the first checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from mtl.checkpoint import (
    CONFIG_KEY,
    SIGNATURE_KEY,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    model_signature,
)
from mtl.merging.initial import model_state
from mtl.merging.lora import fold_lora, lora_scale
from mtl.merging.task_vectors import MergeError, StateDict, first_difference

log = logging.getLogger(__name__)
NO_ADAPTER = "mtl.models.adapters.NoAdapter"
#: Key of the merge's own record (method, sources, base) inside a merged checkpoint.
MERGE_KEY = "mtl_merge"
ENCODER = "backbone."
#: Buffers of BatchNorm layers (never merged arithmetically).
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class SingleTask:
    """One single-task checkpoint: its file, task, stored config and model tensors."""

    path: str
    task: str
    config: DictConfig
    state: StateDict
    #: trained with model/adapter=lora; `state` and `config` are the dense model's
    folded_lora: bool = False


def _stored(checkpoint: dict, path: str) -> DictConfig:
    stored = checkpoint.get(CONFIG_KEY)
    if not isinstance(stored, dict):
        raise MergeError(
            f"checkpoints: {path} holds no stored config; give checkpoints of train.py"
        )
    cfg = OmegaConf.create(stored)
    with open_dict(cfg):
        cfg.model.compile = False
    return cfg


def read_single_task(path: str | Path) -> SingleTask:
    """The checkpoint at `path`, which must hold one task trained without an adapter or with
    a shared LoRA (then folded into the base weights: the run becomes the dense model it
    computes, see `mtl.merging.lora`)."""
    path = str(path)
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError:
        raise MergeError(f"checkpoints: no checkpoint file at {path}") from None
    except CheckpointError as error:
        raise MergeError(f"checkpoints: {error}") from None
    cfg = _stored(checkpoint, path)
    tasks = list(cfg.data.tasks)
    if len(tasks) != 1:
        raise MergeError(
            f"checkpoints: {path} was trained on {tasks}; merging takes single-task checkpoints "
            "(python train.py data.tasks=[TASK])"
        )
    state = model_state(checkpoint)
    adapter = str(OmegaConf.select(cfg, "model.adapter._target_") or NO_ADAPTER)
    adapter = adapter.rsplit(".", 1)[-1]
    if adapter == "LoRA":  # merged as the dense model it computes
        state = fold_lora(state, lora_scale(cfg.model.adapter))
        with open_dict(cfg):
            cfg.model.adapter = {"_target_": NO_ADAPTER, "task_aware": False}
        log.info("%s: LoRA folded into the base weights (merged as a dense model)", path)
    elif adapter != "NoAdapter":
        raise MergeError(
            f"checkpoints: {path} was trained with model/adapter={adapter.lower()}; merging "
            "takes fully fine-tuned (model/adapter=none) or LoRA (model/adapter=lora) encoders"
        )
    return SingleTask(path, tasks[0], cfg, state, folded_lora=adapter == "LoRA")


def _init_source(cfg: DictConfig) -> dict[str, Any]:
    """What a run's encoder started from: an init file, pretrained weights or the seeded
    random initialisation."""
    backbone = cfg.model.backbone
    if cfg.model.get("init_from"):
        return {"model.init_from": str(cfg.model.init_from)}
    if backbone.get("pretrained_file") or backbone.get("pretrained"):
        return {
            "model.backbone.pretrained_file": backbone.get("pretrained_file"),
            "model.backbone.pretrained": bool(backbone.get("pretrained")),
        }
    return {"seed": int(cfg.seed)}


def check_mergeable(runs: Sequence[SingleTask]) -> None:
    """Refuse runs of other architectures (naming the first differing encoder tensor), of the
    same task twice, of other datasets or decoders, or started from other initialisations."""
    if len(runs) < 1:
        raise MergeError("checkpoints: empty; give one single-task checkpoint per task")
    first = runs[0]
    seen: dict[str, str] = {}
    for run in runs:
        if run.task in seen:
            raise MergeError(
                f"checkpoints: {seen[run.task]} and {run.path} are both {run.task} models; "
                "give one per task"
            )
        seen[run.task] = run.path
    reference = encoder(first.state)
    for run in runs[1:]:
        difference = first_difference(reference, encoder(run.state))
        if difference:
            raise MergeError(
                f"checkpoints: {run.path} has another architecture than {first.path}: {difference}"
            )
        for key in ("model.decoder", "data.name", "data.image_size", "data.val_fraction",
                    "data.val_seed"):  # fmt: skip
            if OmegaConf.select(run.config, key) != OmegaConf.select(first.config, key):
                raise MergeError(f"checkpoints: {run.path} and {first.path} differ in {key}")
        if _init_source(run.config) != _init_source(first.config):
            raise MergeError(
                f"checkpoints: {run.path} and {first.path} start from different initialisations "
                f"({_init_source(run.config)} vs {_init_source(first.config)}); train them with "
                "one model.init_from=FILE (or one seed)"
            )


def encoder(state: StateDict) -> StateDict:
    return {k: v for k, v in state.items() if k.startswith(ENCODER)}


def is_bn_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def merged_keys(model: nn.Module) -> list[str]:
    """The encoder's parameters: the tensors merging methods combine."""
    return [f"{ENCODER}{name}" for name, _ in model.backbone.named_parameters()]


def base_weights(base: str | None, runs: Sequence[SingleTask]) -> tuple[StateDict, str]:
    """θ₀'s encoder and where it came from: the checkpoint `base`; else the runs' own start
    (their ``model.init_from`` file, or the model their stored config builds: pretrained
    weights, or the random initialisation of their seed, rebuilt exactly as ``train.py`` does)."""
    from mtl.train import build_model  # heavy imports, only for the command

    first = runs[0]
    if base is None and first.config.model.get("init_from"):
        base = str(first.config.model.init_from)
    if base is not None:
        try:
            state = model_state(load_checkpoint(base))
        except FileNotFoundError:
            raise MergeError(f"base: no checkpoint file at {base}") from None
        except CheckpointError as error:
            raise MergeError(f"base: {error}") from None
        source = str(base)
    else:
        cfg = first.config.copy()
        with open_dict(cfg):
            cfg.model.init_from = None
        L.seed_everything(cfg.seed, verbose=False)  # as mtl.train before building the model
        state = build_model(cfg).state_dict()
        source = f"initialisation of {first.path}'s config ({_init_source(first.config)})"
    reference = encoder(first.state)
    difference = first_difference(reference, encoder(state))
    if difference:
        raise MergeError(f"base: {source} has another architecture than {first.path}: {difference}")
    return encoder(state), source


def assemble(
    model: nn.Module,
    merged: StateDict,
    runs: Sequence[SingleTask],
    average_bn: bool,
) -> StateDict:
    """The multi-task model's state: the merged encoder parameters, BatchNorm statistics
    averaged (`average_bn`) or left for recomputation, other encoder buffers from the first
    run, each task's decoder from its run."""
    state = dict(model.state_dict())
    first = runs[0]
    for name in state:
        if name in merged:
            state[name] = merged[name].to(state[name].dtype)
        elif name.startswith(ENCODER):
            if is_bn_buffer(name) and average_bn:
                stacked = torch.stack([run.state[name].double() for run in runs])
                state[name] = stacked.mean(0).to(state[name].dtype)
            else:
                state[name] = first.state[name]
    for run in runs:
        prefix = f"decoders.{run.task}."
        for name, value in run.state.items():
            if name.startswith(prefix):
                state[name] = value
    return state


def merged_config(runs: Sequence[SingleTask]) -> DictConfig:
    """The first run's config, with every run's task (in the order given) and no init file
    (the merged checkpoint brings all weights)."""
    cfg = runs[0].config.copy()
    with open_dict(cfg):
        cfg.data.tasks = [run.task for run in runs]
        cfg.model.init_from = None
        loss_weights = {}
        for run in runs:  # each task's own weight from its run
            weights = OmegaConf.to_container(run.config.data.get("loss_weights") or {})
            if run.task in weights:
                loss_weights[run.task] = weights[run.task]
        if loss_weights:
            cfg.data.loss_weights = {
                **OmegaConf.to_container(cfg.data.loss_weights),
                **loss_weights,
            }
    return cfg


def save_merged(
    module: L.LightningModule, cfg: DictConfig, path: Path, record: dict[str, Any], step: int = 0
) -> None:
    """A checkpoint that ``eval.py``, ``predict.py`` and ``mtl.load`` take as any other: the
    module's weights, its model signature and stored config, and the merge's `record`."""
    total = sum(p.numel() for p in module.model.parameters())
    checkpoint = {
        "state_dict": module.state_dict(),
        "epoch": 0,
        "global_step": int(step),
        "pytorch-lightning_version": L.__version__,
        SIGNATURE_KEY: model_signature(cfg, total),
        CONFIG_KEY: OmegaConf.to_container(cfg, resolve=True),
        MERGE_KEY: record,
    }
    atomic_save(checkpoint, path)


def recompute_batchnorm(backbone: nn.Module, images: Sequence[Tensor] | Any) -> None:
    """Reset and re-estimate the encoder's BatchNorm statistics from `images` (cumulative
    average over the batches), with ``torch.optim.swa_utils.update_bn``."""
    torch.optim.swa_utils.update_bn(images, backbone)
