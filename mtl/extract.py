"""Extract a small single-task model from a mixture-of-experts checkpoint (Mod-Squad's pruning).

    python -m mtl.extract ckpt_path=PATH task=semseg [thresh=3] [output=PATH]

For every routed layer (``model/adapter=modsquad`` or ``moe``) the task's expert usage, the EMA
of its selections recorded while training, is normalised to percent; the experts above
``thresh / k`` percent are kept (k: the layer's top-k), and at least the k most used. The model
is rebuilt for the one task with only those experts (``model.adapter.kept_experts``) and its
decoder, the weights are copied, and the result is written as a checkpoint that ``eval.py``,
``predict.py`` and `mtl.load` read like any other (its stored config says what it is). The
routers keep all their outputs, so routing probabilities are the full model's: on every token
whose top k lies among the kept experts the extracted model computes what the full model did.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from omegaconf import open_dict
from torch import nn

from mtl.checkpoint import CONFIG_KEY, SIGNATURE_KEY, atomic_save, load_checkpoint, model_signature
from mtl.config import ConfigError
from mtl.models.adapters.task_batch import block_names

log = logging.getLogger(__name__)

#: Mod-Squad's default threshold (``--thresh``): keep experts used above 3 / k percent.
THRESH = 3.0
#: Training state of the full model that does not fit the extracted one.
DROPPED_KEYS = ("optimizer_states", "lr_schedulers")


def routed_layers(backbone_model: nn.Module) -> dict[int, nn.Module]:
    """Block index -> the routed layer inside it (one per block), for a timm backbone."""
    layers = {}
    for index, name in enumerate(block_names(backbone_model)):
        for module in backbone_model.get_submodule(name).modules():
            if all(hasattr(module, a) for a in ("kept", "expert_usage", "expert_parameters")):
                layers[index] = module
    return layers


def kept_experts(usage: torch.Tensor, top_k: int, thresh: float, held: Sequence[int]) -> list[int]:
    """Experts (original ids, among those `held`) whose share of the selections exceeds
    ``thresh / top_k`` percent; the `top_k` most used when fewer pass."""
    share = 100 * usage / usage.sum()
    keep = [e for e in held if share[e] > thresh / top_k]
    if len(keep) < top_k:
        ranked = sorted(held, key=lambda e: -float(usage[e]))
        keep = ranked[:top_k]
    return sorted(keep)


def extract(
    checkpoint: Mapping[str, Any], task: str, thresh: float = THRESH
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The single-task checkpoint of `task` and a summary (``kept``: block -> expert ids,
    ``params_full``, ``params_extracted``) from a full-model `checkpoint` (as loaded)."""
    from mtl.api import MODEL_PREFIX, stored_config
    from mtl.train import build_model, build_module, count_parameters

    cfg = stored_config(checkpoint, "ckpt_path")
    tasks = list(cfg.data.tasks)
    if task not in tasks:
        raise ConfigError(
            f"task: {task!r} is not a task of the checkpoint; expected one of {tasks}"
        )
    full = build_model(cfg)
    state = {
        k[len(MODEL_PREFIX) :]: v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(MODEL_PREFIX)
    }
    full.load_state_dict(state)
    layers = routed_layers(full.backbone.model)
    if not layers:
        raise ConfigError(
            f"ckpt_path: the model has no mixture-of-experts layers (model.adapter: "
            f"{cfg.model.adapter.get('_target_')}); extraction needs model/adapter=modsquad or moe"
        )
    row = tasks.index(task)
    kept = {}
    for index, layer in layers.items():
        usage = layer.expert_usage[row]
        if usage.sum() <= 0:
            raise ConfigError(
                f"ckpt_path: no expert usage recorded for {task!r} (block {index}); the "
                "checkpoint was not trained with this version, or not trained at all"
            )
        kept[index] = kept_experts(usage, layer.top_k, thresh, layer.kept)

    plain = copy.deepcopy(checkpoint[CONFIG_KEY])
    plain["data"]["tasks"] = [task]
    plain["model"]["adapter"]["kept_experts"] = kept
    small_cfg = stored_config({CONFIG_KEY: plain}, "ckpt_path")
    with open_dict(small_cfg):
        small_cfg.delta_m_baselines = None
    module = build_module(small_cfg)
    module.model.load_state_dict(_copied_state(full, module.model, layers, kept, row))

    out = {k: v for k, v in checkpoint.items() if k not in DROPPED_KEYS}
    out.setdefault("pytorch-lightning_version", lightning.__version__)  # Lightning reads it
    out["state_dict"] = module.state_dict()
    out[CONFIG_KEY] = plain
    params = count_parameters(module.model)["params/total"]
    out[SIGNATURE_KEY] = model_signature(small_cfg, params)
    summary = {
        "kept": kept,
        "experts": {i: len(layer.kept) for i, layer in layers.items()},
        "params_full": count_parameters(full)["params/total"],
        "params_extracted": params,
    }
    return out, summary


def _copied_state(
    full: nn.Module, small: nn.Module, layers: Mapping[int, nn.Module], kept, row: int
) -> dict[str, torch.Tensor]:
    """`small`'s state dict filled from `full`: kept expert slices, the task's usage row, the
    rest by name."""
    source = full.state_dict()
    names = {id(m): n for n, m in full.named_modules()}
    sliced = {}
    for index, layer in layers.items():
        prefix = names[id(layer)]
        local = [layer.kept.index(e) for e in kept[index]]
        for param in layer.expert_parameters():
            sliced[f"{prefix}.{param}"] = local
    state = {}
    for key, target in small.state_dict().items():
        value = source[key]
        if key in sliced:
            value = value[sliced[key]]
        elif key.endswith("expert_usage"):
            value = value[row : row + 1]
        if value.shape != target.shape:  # a bug of this module, not of the user's input
            raise RuntimeError(f"extract: {key} {tuple(value.shape)} != {tuple(target.shape)}")
        state[key] = value.clone()
    return state


def parse(argv: Sequence[str]) -> dict[str, str]:
    """``key=value`` arguments; ConfigError on anything else."""
    allowed = ("ckpt_path", "task", "thresh", "output")
    args = {}
    for word in argv:
        key, sep, value = word.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"{word!r}: expected key=value with a key among {list(allowed)}")
        args[key] = value
    missing = [k for k in ("ckpt_path", "task") if not args.get(k)]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: missing; python -m mtl.extract "
            "ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt task=semseg"
        )
    return args


def run(argv: Sequence[str]) -> Path:
    """Parse, extract, write; returns the written file."""
    args = parse(argv)
    try:
        thresh = float(args.get("thresh", THRESH))
    except ValueError:
        raise ConfigError(f"thresh: {args['thresh']!r}; expected a number") from None
    source = Path(args["ckpt_path"])
    if not source.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {source}")
    checkpoint = load_checkpoint(source, map_location="cpu")
    out, summary = extract(checkpoint, args["task"], thresh)
    target = Path(args.get("output") or source.with_name(f"{source.stem}_{args['task']}.ckpt"))
    atomic_save(out, target)
    for index, experts in summary["kept"].items():
        print(f"block {index}: {len(experts)} of {summary['experts'][index]} experts {experts}")
    full, small = summary["params_full"], summary["params_extracted"]
    print(f"parameters: {small:,} of {full:,} ({small / full:.1%})")
    print(f"wrote {target}")
    return target


def main() -> None:
    from mtl.cli import reporting_errors

    logging.basicConfig(level=logging.WARNING)
    reporting_errors(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
