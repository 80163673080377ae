"""``model.slim``: building the recipe, and the config checks run before anything is built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from mtl.slim.apply import DECODERS, Slimming, backbone_problems


def _enabled(node: Any) -> bool:
    return isinstance(node, Mapping | DictConfig) and bool(node.get("_target_"))


def build_slimming(node: Any) -> Slimming | None:
    """The `Slimming` of a ``model.slim`` node; None for ``model/slim=off``."""
    return instantiate(node, _convert_="all") if _enabled(node) else None


def slim_problems(cfg: DictConfig) -> list[str]:
    """Every combination that slimming cannot support, one line each naming the key."""
    node = cfg.model.get("slim")
    if not _enabled(node):
        return []
    try:
        get_class(node._target_)
    except Exception as error:  # hydra wraps import errors in several types
        return [f"model.slim._target_: cannot import '{node._target_}' ({error})"]
    options = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k[0] != "_"}
    problems = []
    try:
        Slimming(**options)
    except (TypeError, ValueError) as error:
        problems.append(str(error) if str(error).startswith("model.") else f"model.slim: {error}")
    fixed = options.get("fixed") or {}
    tasks = [] if isinstance(cfg.data.tasks, str) else list(cfg.data.tasks)
    roles = ["encoder", *tasks]
    if not isinstance(fixed, dict) or not set(fixed) <= set(roles):
        problems.append(f"model.slim.fixed: {fixed!r}; expected a width per role of {roles}")
    elif any(w not in (options.get("widths") or [1.0]) for w in fixed.values()):
        problems.append(
            f"model.slim.fixed: {fixed!r}; every width must be one of model.slim.widths"
        )
    adapter = (cfg.model.get("adapter") or {}).get("_target_") or ""
    if adapter.rsplit(".", 1)[-1] not in ("NoAdapter", "Adapter", ""):
        problems.append(
            f"model.adapter: {adapter.rsplit('.', 1)[-1]} cannot be combined with model/slim=on "
            "(slimming replaces the layers adapters modify); use model/adapter=none"
        )
    decoder = (cfg.model.get("decoder") or {}).get("_target_") or ""
    if decoder and decoder.rsplit(".", 1)[-1] not in DECODERS:
        problems.append(
            f"model.decoder: {decoder.rsplit('.', 1)[-1]} cannot be slimmed (model/slim=on); "
            "use model/decoder=conv or model/decoder=hrnet"
        )
    if cfg.balancer.get("mode", "param") == "rep":
        problems.append(
            "balancer.mode: 'rep' balances at the shared features of one forward pass, but "
            "model/slim=on trains several widths per step; use balancer.mode=param"
        )
    if (cfg.get("regularizer") or {}).get("_target_"):
        problems.append(
            "regularizer: a representation regulariser sees one forward pass, but model/slim=on "
            "trains several widths per step; use regularizer=none"
        )
    if cfg.model.get("compile") and not options.get("fixed"):
        problems.append(
            "model.compile: the widths of model/slim=on change at every step (a recompilation "
            "each time); set model.compile=false"
        )
    if "ddp" in str(cfg.trainer.get("strategy", "")).lower() and not options.get("fixed"):
        problems.append(
            "trainer.strategy: ddp with model/slim=on is not supported (the switchable norms of "
            "widths not drawn at a step get no gradient); train on one device"
        )
    return problems + _backbone_problems(cfg)


def _backbone_problems(cfg: DictConfig) -> list[str]:
    """The backbone built on the meta device (no weights) and checked for slimmable blocks."""
    from mtl.models.backbone import meta_backbone

    model = meta_backbone(OmegaConf.to_container(cfg.model.backbone, resolve=True))
    if model is None:
        return []
    return [f"{p} ({cfg.model.backbone.name})" for p in backbone_problems(model.model)]
