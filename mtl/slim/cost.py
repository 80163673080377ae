"""Counted FLOPs of a slimmable model per role and width, and their cache next to a checkpoint.

The backbone's cost depends on the encoder width only and each decoder's on its own width (the
shared features keep their channels at every width), so the cost of a configuration is
``encoder[w_e] + sum_t decoder_t[w_t]``: 1 + T x |widths| counted passes give every
configuration. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products,
convolutions, attention; a multiply-add counts 2; normalisation and resizing are not counted).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtl.slim.widths import ENCODER, at_widths


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the operators `fn` runs (`FlopCounterMode`)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class CostTable:
    """Counted FLOPs of one image of `image_size`: the encoder's per width, each decoder's per
    width (keys are the widths as strings, for JSON)."""

    image_size: list[int]
    widths: list[float]
    encoder: dict[str, int]
    decoders: dict[str, dict[str, int]]

    def flops(self, config: Mapping[str, float]) -> int:
        """FLOPs of a configuration (roles left out run at full width)."""
        total = self.encoder[str(float(config.get(ENCODER, 1.0)))]
        return total + sum(
            table[str(float(config.get(task, 1.0)))] for task, table in self.decoders.items()
        )

    @property
    def full(self) -> int:
        return self.flops({})


@torch.no_grad()
def cost_table(model: nn.Module, image_size: Sequence[int], widths: Sequence[float]) -> CostTable:
    """Count the FLOPs of `model` (a slimmable `MultiTaskModel`) at every width."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, *image_size, device=device)
    encoder, decoders = {}, {task: {} for task in model.tasks}
    features = model.backbone(images)
    for width in widths:
        with at_widths(model, {ENCODER: width}):
            encoder[str(float(width))] = count_flops(lambda: model.backbone(images))
        for task, head in model.decoders.items():
            with at_widths(model, {task: width}):
                decoders[task][str(float(width))] = count_flops(lambda h=head: h(features))
    model.train(was_training)
    return CostTable(list(image_size), [float(w) for w in widths], encoder, decoders)


def cached_cost_table(
    model: nn.Module, image_size: Sequence[int], widths: Sequence[float], checkpoint: Path
) -> CostTable:
    """`cost_table`, computed once per checkpoint and input size and kept in
    ``<checkpoint>.flops.json`` next to it (refreshed when the checkpoint is newer)."""
    cache = checkpoint.with_name(checkpoint.name + ".flops.json")
    key = {"image_size": list(image_size), "widths": [float(w) for w in widths]}
    if cache.is_file() and cache.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        try:
            stored = json.loads(cache.read_text())
            if {k: stored.get(k) for k in key} == key and set(stored["decoders"]) == set(
                model.tasks
            ):
                return CostTable(**stored)
        except (ValueError, KeyError, TypeError):
            pass  # damaged: counted again
    table = cost_table(model, image_size, widths)
    with contextlib.suppress(OSError):  # a read-only checkpoint folder: count again next time
        cache.write_text(json.dumps(asdict(table), indent=1))
    return table
