"""Optional ``torch.compile`` of the backbone (``model.compile``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from mtl.config import ConfigError
from mtl.models.multitask import MultiTaskModel

log = logging.getLogger(__name__)


def compile_options(value: Any) -> dict[str, Any] | None:
    """``model.compile`` as keyword arguments of ``torch.compile`` (None: do not compile).
    Accepts false/true or a mapping such as ``{mode: max-autotune}``."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(
        f"model.compile: {value!r}; expected true, false or torch.compile options "
        "such as {mode: max-autotune}"
    )


def compile_backbone(model: MultiTaskModel, value: Any) -> bool:
    """Compile the backbone's forward in place (parameter names and checkpoints unchanged).

    The heads, losses and balancers stay eager: per-task ``autograd.grad`` calls and
    perturbed re-evaluations work on the compiled graph. Task-aware backbones (MoE routing,
    per-task LoRA) have data-dependent shapes and are left eager with a warning. Returns
    whether the backbone was compiled."""
    options = compile_options(value)
    if options is None:
        return False
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            "model.compile: torch.compile is not supported by this Python/PyTorch build; "
            "set model.compile=false"
        )
    if model.task_aware_backbone:
        log.warning(
            "model.compile: the backbone is task-aware (routing or per-task adapters with "
            "data-dependent shapes) and stays eager"
        )
        return False
    model.backbone.compile(**options)
    log.info("model.compile: backbone compiled with %s", options or "defaults")
    return True
