"""Controllable compute at deployment (README "Controllable compute")::

    python -m mtl.control ckpt_path=PATH budget=0.5 preference="{semseg:0.6,depth:0.3}"

For a checkpoint trained with ``model/slim=on``: the FLOPs of every encoder and decoder width
at the model's evaluation input size (counted once, cached next to the checkpoint), the width
configuration for the budget and the preference (`mtl.slim.search`), and a pruned checkpoint of
that sub-network (`mtl.slim.export`) that ``eval.py``, ``predict.py`` and ``mtl.load`` accept.
With ``tasks=[...]`` only those heads are kept (single-task deployment) and the budget is a
fraction of the full-width model with those heads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mtl.cli import reporting_errors
from mtl.config import ConfigError
from mtl.slim.search import SearchError

log = logging.getLogger(__name__)


def default_output(path: Path, budget: float, preference: dict[str, float] | None) -> Path:
    tag = "-".join(f"{t}{p:g}" for t, p in (preference or {}).items()) or "equal"
    return path.with_name(f"{path.stem}-budget{budget:g}-{tag}.ckpt")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Search and export; returns what was printed (widths, FLOPs, parameters, output)."""
    from mtl.api import load
    from mtl.checkpoint import load_checkpoint
    from mtl.slim.cost import cached_cost_table
    from mtl.slim.export import export_checkpoint, slim_node
    from mtl.slim.search import search

    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path: missing; give the checkpoint of a run trained with model/slim=on, e.g. "
            "ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt"
        )
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
    preference = OmegaConf.to_container(cfg.preference) if cfg.get("preference") else None
    if preference is not None and not isinstance(preference, dict):
        raise SearchError(
            f"preference: {preference!r}; expected a mapping of task to weight, e.g. "
            "preference='{semseg:0.6,depth:0.4}'"
        )
    checkpoint = load_checkpoint(path)
    node = slim_node(checkpoint, path)
    loaded = load(path)
    size = loaded.input_size or (224, 224)
    table = cached_cost_table(loaded.model, size, node.get("widths") or [1.0], path)
    tasks = list(cfg.tasks) if cfg.get("tasks") else list(loaded.tasks)
    if isinstance(cfg.get("tasks"), str) or not set(tasks) <= set(loaded.tasks):
        raise SearchError(
            f"tasks: {cfg.tasks!r}; expected a list of the model's tasks {loaded.tasks}, "
            "e.g. tasks=[semseg]"
        )
    table.decoders = {t: table.decoders[t] for t in tasks}  # the heads kept
    choice = search(table, cfg.budget, preference)
    output = Path(cfg.output) if cfg.get("output") else default_output(path, cfg.budget, preference)
    exported = export_checkpoint(checkpoint, loaded.model, choice.widths, output, size, tasks)
    flops = exported.flops
    report = {
        "widths": choice.widths,
        "flops": flops,
        "full_flops": table.full,
        "flops_fraction": flops / table.full,
        "parameters": exported.parameters,
        "full_parameters": exported.full_parameters,
        "tasks": tasks,
        "output": str(output),
    }
    log.info(
        "widths %s | %.3f GFLOPs of %.3f (%.1f%%, %dx%d input) | %s parameters of %s | %s",
        ", ".join(f"{role} {w:g}" for role, w in choice.widths.items()),
        flops / 1e9,
        table.full / 1e9,
        100 * flops / table.full,
        *size,
        f"{exported.parameters:,}",
        f"{exported.full_parameters:,}",
        output,
    )
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="control")
def main(cfg: DictConfig) -> None:
    reporting_errors(lambda: run(cfg), extra=(SearchError,))


if __name__ == "__main__":
    main()
