"""The config an evaluation builds its model and data from: the checkpoint's stored config, with
what the command line changed on top.

Every checkpoint written by ``train.py`` holds the run's resolved config (``mtl_config``). An
evaluation (``eval.py``, ``train.py train=false``) takes the sections that define the model and
its data (`SECTIONS`) from there, so that a checkpoint is evaluated without repeating its
training overrides. What the user typed still wins:

- ``key=value`` (also ``+key=value``, ``++key=value``) inside a section: the typed value;
  ``~key`` removes the key;
- an option of a group inside the sections (``model/backbone=vit_tiny``, ``data=nyud``,
  ``balancer=famo``): the chosen node, whole;
- an option of another group (``experiment=NAME``, ``debug=fdr``): every value inside the
  sections that the option changes, as if each were typed.

Everything outside the sections (trainer, logger, paths, callbacks, ``delta_m_baselines``,
``save_predictions``) comes from the composed config as usual. Hydra parses the overrides
(`OverridesParser`); which values a group option changes is found by composing the config once
more without the group options and comparing, since Hydra does not report it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl.redact import REDACTED

log = logging.getLogger(__name__)

#: The sections of the stored config an evaluation builds from: the model, its tasks and data,
#: and the balancer and flat-region wrapper (their state is part of the checkpoint).
SECTIONS = ("data", "model", "balancer", "flat")

_MISSING = object()


def _section(key: str) -> str:
    return key.split(".", 1)[0]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of nested mappings (lists and empty mappings are
    leaves)."""
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def group_changes(cfg: DictConfig, without_groups: DictConfig) -> tuple[list[str], list[str]]:
    """Keys of `SECTIONS` whose values differ between `cfg` and the same composition without
    the group options (`without_groups`): (changed or added keys, removed keys)."""
    changed, removed = [], []
    for section in SECTIONS:
        mine = _leaves(_container(cfg.get(section)), f"{section}.")
        base = _leaves(_container(without_groups.get(section)), f"{section}.")
        changed += [k for k, v in mine.items() if base.get(k, _MISSING) != v]
        removed += [k for k in base if k not in mine]
    return changed, removed


def _container(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node


def split_overrides(
    overrides: Sequence[str], groups: Collection[str]
) -> tuple[list[str], list[str], list[str]]:
    """The command line's overrides as (options of groups outside `SECTIONS`, keys set inside
    `SECTIONS`, keys removed inside `SECTIONS`); `groups` are the config group names (Hydra's
    ``runtime.choices``). An option of a group inside `SECTIONS` (``model/backbone=x``) sets
    its whole node (``model.backbone``)."""
    group_options, assigned, deleted = [], [], []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        if key in groups:
            node = (override.package or key).replace("/", ".")
            if _section(node) in SECTIONS:  # e.g. model/backbone=x: the chosen node, whole
                (deleted if override.is_delete() else assigned).append(node)
            else:  # e.g. experiment=x, debug=fdr: the values it sets
                group_options.append(override.input_line)
        elif _section(key) in SECTIONS:
            (deleted if override.is_delete() else assigned).append(key)
    return group_options, assigned, deleted


def evaluation_config(
    cfg: DictConfig,
    stored: Mapping[str, Any],
    overrides: Sequence[str],
    groups: Collection[str] = (),
    compose: Callable[[list[str]], DictConfig] | None = None,
) -> DictConfig:
    """`cfg` with `SECTIONS` taken from `stored` (a checkpoint's config) and the command line's
    changes put back on top (see the module docstring).

    Args:
        cfg: the composed config (with the overrides applied).
        stored: the checkpoint's stored config, plain and resolved.
        overrides: the command line's overrides (Hydra's ``overrides.task``).
        groups: config group names, to tell ``model/backbone=x`` from ``model.x=y``.
        compose: composes the config with the given overrides; needed only when the command
            line has group options.
    """
    group_options, assigned, deleted = split_overrides(overrides, groups)
    removed: list[str] = list(deleted)
    if group_options and compose is not None:
        others = [o for o in overrides if o not in group_options]
        changed, gone = group_changes(cfg, compose(others))
        assigned += changed
        removed += gone
    typed = [*assigned, *(f"~{k}" for k in removed)]
    merged = cfg.copy()
    with open_dict(merged):
        for section in SECTIONS:
            if section in stored and stored[section] is not None:
                merged[section] = OmegaConf.create(dict(stored[section]))
        for key in removed:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
        for section in SECTIONS:  # values redacted when stored (mtl/redact.py): composed ones
            stored_leaves = _leaves(_container(merged.get(section)), f"{section}.")
            for key, value in stored_leaves.items():
                if value == REDACTED and key not in assigned:
                    log.warning("%s: redacted in the checkpoint; using the composed value", key)
                    assigned.append(key)
        for key in dict.fromkeys(assigned):  # each key once, in order
            value = OmegaConf.select(cfg, key, default=None)
            if isinstance(value, DictConfig | list) or OmegaConf.is_list(value):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
    if typed:
        log.info(
            "evaluation: model and data from the checkpoint's stored config; from the command "
            "line: %s",
            ", ".join(dict.fromkeys(typed)),
        )
    return merged


def section_overrides(overrides: Sequence[str], groups: Collection[str]) -> list[str]:
    """The overrides that change the model or its data (the ones to drop when a checkpoint
    does not fit)."""
    group_options, assigned, deleted = split_overrides(overrides, groups)
    changing = {*assigned, *deleted}
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        o.input_line
        for o in parsed
        if o.input_line in group_options
        or (o.package or o.key_or_group).replace("/", ".") in changing
    ]
